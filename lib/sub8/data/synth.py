"""The embedded speech corpus: Debian's TTS engines speak the texts of :mod:`sub8.data.texts`, and
speed perturbation, padding and additive noise make the audio varied.

Two steps, both deterministic:

1. :func:`make_recipe` draws one plain-dict recipe per utterance from ``CorpusConfig.seed``: text, engine, voice,
   speaking rate, pitch, speed, padding, noise kind and SNR, peak level, noise seed. The recipe is committed
   (``data_manifests/<profile>/recipe.jsonl``) and is the corpus's definition.
2. :func:`build_corpus` renders the recipe into 16 kHz mono 16-bit WAV files under ``runs/<profile>/data/audio``,
   writes the NeMo manifests, and checks the files' sha256 against the committed ``sha256.txt`` (another engine
   version renders different samples; that is reported, not fatal).

Voices are held out by split: dev and test voices are never heard in training (see :func:`voice_pool`).
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import re
import shutil
import subprocess
import tempfile
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from functools import cache, partial
from itertools import groupby
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF
from tqdm.auto import tqdm

from sub8.data.audio import audio_info, save_wav
from sub8.data.manifest import Utterance, write_manifest
from sub8.data.texts import TEXT_PATTERN, draw_text
from sub8.io import atomic_write_text
from sub8.profiles import SPLITS, CorpusConfig, Profile

# ---------------------------------------------------------------------------------------------------------------
# Voices. A split's voices are never heard by an earlier split in HOLDOUT_ORDER: train < dev < test.
# espeak-ng voices are accent+variant; such a voice belongs to the later split of its accent's and its variant's,
# so a test voice has an accent or a variant training never heard. No mbrola voices (mbrola is not in Debian main).
HOLDOUT_ORDER = SPLITS  # train, dev, test
ESPEAK_ACCENTS = {
    "train": ("en-us", "en-gb", "en-gb-x-rp", "en-gb-x-gbclan", "en-us-nyc"),
    "dev": ("en-gb-x-gbcwmd",),
    "test": ("en-gb-scotland", "en-029"),
}
# Natural-sounding variants only (no robots, echoes, whispers or croaks), both genders in every split.
ESPEAK_VARIANTS = {
    "train": ("m1", "m2", "m3", "m4", "m6", "m7", "f1", "f2", "f4", "klatt", "klatt3", "klatt4", "Andy", "Annie",
              "david", "linda", "paul", "robert"),
    "dev": ("m8", "f5", "klatt2", "steph"),
    "test": ("m5", "f3", "klatt5", "Alex", "belinda", "quincy"),
}
# flite's kal (8 kHz) and awb_time (a talking clock) are left out. slt is the only female non-espeak voice:
# it stays in training (flite and festival's HTS slt are the same speaker, so both stay there).
FLITE_VOICES = {"train": ("kal16", "awb", "slt"), "dev": (), "test": ("rms",)}
FESTIVAL_VOICES = {"train": ("kal_diphone", "cmu_us_slt_arctic_hts"), "dev": (), "test": ("ked_diphone",)}
ENGINE_BINARIES = {"espeak": "espeak-ng", "flite": "flite", "festival": "festival"}
# Share of each engine in a split (renormalised over the engines the split has voices of): espeak-ng has by far
# the most voices, the others the most natural ones.
ENGINE_WEIGHTS = {"espeak": 0.6, "flite": 0.25, "festival": 0.15}

# ---------------------------------------------------------------------------------------------------------------
# Parameter ranges, drawn uniformly per utterance.
RATE_RANGE = (0.85, 1.15)  # speaking rate relative to the engine's default
PITCH_RANGE = (0.8, 1.25)  # relative pitch, where the voice supports it (espeak-ng; flite kal16/awb/slt)
SPEED_RANGE = (0.9, 1.1)  # speed perturbation by resampling (tempo and pitch together)
PAD_RANGE_S = (0.05, 0.5)  # silence (then noise) before and after the speech
NOISE_KINDS = ("none", "white", "pink", "brown")
SNR_RANGE_DB = (5.0, 30.0)
PEAK_RANGE_DBFS = (-20.0, -1.0)  # peak level of the final mix
# Every utterance also gets white noise at this RMS level, like a microphone's self-noise. Without it the engines'
# digital silence (exact zeros) becomes log(eps) = -15.9 in every mel bin: a quarter of the frames of a noise-free
# utterance sat at that floor, global CMVN's std came out at 8-10 instead of ~3, and the speech frames' spectral
# detail was squashed into a narrow band (a small RNN-T then stayed on its plateau for 600 steps).
NOISE_FLOOR_DBFS = -70.0

ESPEAK_DEFAULT_WPM = 175
ESPEAK_DEFAULT_PITCH = 50  # espeak-ng's -p scale is 0..99
FLITE_PITCHLESS_VOICES = ("rms",)  # a unit-selection voice: flite ignores f0_shift for it
# torchaudio's resampler is slow between rates with few common factors (e.g. 22093 -> 16000), so the
# speed-perturbed source rate is rounded to this many Hz.
SPEED_RATE_QUANTUM_HZ = 100
CHUNK_SIZE = 32  # utterances per worker task (one festival process each)

RECIPE_KEYS = ("id", "split", "text", "engine", "voice", "rate", "pitch", "speed", "pad_start", "pad_end",
               "noise", "snr_db", "peak_dbfs", "seed")
MAX_LISTED_IDS = 5


class SynthesisError(RuntimeError):
    """A TTS engine is missing or failed; the message names the utterance, engine, voice and the engine's stderr."""


def voice_pool(split: str) -> dict[str, tuple[str, ...]]:
    """The voices of ``split`` per engine: ``{"espeak": ("en-us+m1", ...), "flite": (...), "festival": (...)}``."""
    rank = _holdout_rank(split)
    espeak = tuple(
        f"{accent}+{variant}"
        for accent_split, accents in ESPEAK_ACCENTS.items()
        for variant_split, variants in ESPEAK_VARIANTS.items()
        if max(_holdout_rank(accent_split), _holdout_rank(variant_split)) == rank
        for accent in accents
        for variant in variants
    )
    return {"espeak": espeak, "flite": FLITE_VOICES[split], "festival": FESTIVAL_VOICES[split]}


def make_recipe(corpus: CorpusConfig) -> list[dict[str, Any]]:
    """One recipe dict per utterance (keys RECIPE_KEYS), train then dev then test, deterministic in ``corpus``.

    Each split draws from its own stream of ``corpus.seed``, so resizing one split leaves the others unchanged.
    """
    recipe = []
    for split, size in _split_sizes(corpus).items():
        rng = np.random.default_rng([corpus.seed, HOLDOUT_ORDER.index(split)])
        pool = {engine: voices for engine, voices in voice_pool(split).items() if voices}
        engines = list(pool)
        weights = np.array([ENGINE_WEIGHTS[e] for e in engines])
        weights /= weights.sum()
        for i in range(size):
            text = draw_text(corpus.task, split, rng)
            engine = engines[rng.choice(len(engines), p=weights)]
            voice = pool[engine][rng.integers(len(pool[engine]))]
            noise = NOISE_KINDS[rng.integers(len(NOISE_KINDS))]
            recipe.append(
                {
                    "id": f"{split}-{i:05d}",
                    "split": split,
                    "text": text,
                    "engine": engine,
                    "voice": voice,
                    "rate": _uniform(rng, RATE_RANGE),
                    "pitch": _uniform(rng, PITCH_RANGE) if _has_pitch_control(engine, voice) else None,
                    "speed": _uniform(rng, SPEED_RANGE),
                    "pad_start": _uniform(rng, PAD_RANGE_S),
                    "pad_end": _uniform(rng, PAD_RANGE_S),
                    "noise": noise,
                    "snr_db": _uniform(rng, SNR_RANGE_DB, decimals=1) if noise != "none" else None,
                    "peak_dbfs": _uniform(rng, PEAK_RANGE_DBFS, decimals=1),
                    "seed": int(rng.integers(2**31)),
                }
            )
    return recipe


def write_recipe(path: str | Path, recipe: list[dict[str, Any]]) -> None:
    """Write ``recipe`` as JSONL (one utterance a line, keys in RECIPE_KEYS order), atomically."""
    lines = [json.dumps({key: entry[key] for key in RECIPE_KEYS}) for entry in recipe]
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_recipe(path: str | Path) -> list[dict[str, Any]]:
    """Read and validate a recipe; a bad line raises ValueError naming ``path:LINE`` and what is wrong."""
    path = Path(path)
    recipe, seen_ids = [], set()
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{line_no}: invalid JSON ({e.msg})") from None
        problem = _recipe_problem(entry, seen_ids)
        if problem:
            raise ValueError(f"{path}:{line_no}: {problem}")
        seen_ids.add(entry["id"])
        recipe.append(entry)
    return recipe


def _recipe_problem(entry: Any, seen_ids: set[str]) -> str | None:
    """What is wrong with one recipe entry, or None."""
    if not isinstance(entry, dict) or set(entry) != set(RECIPE_KEYS):
        return f"expected an object with exactly the keys {list(RECIPE_KEYS)}"
    if entry["id"] in seen_ids:
        return f"duplicate id {entry['id']!r}"
    if entry["split"] not in SPLITS:
        return f"unknown split {entry['split']!r}"
    if not _is_text(entry["text"]):
        return f"text {entry['text']!r} is not lower-case words separated by single spaces"
    if entry["engine"] not in ENGINE_BINARIES:
        return f"unknown engine {entry['engine']!r}"
    if entry["voice"] not in _known_voices(entry["engine"]):
        return f"unknown {entry['engine']} voice {entry['voice']!r}"
    if entry["noise"] not in NOISE_KINDS:
        return f"unknown noise {entry['noise']!r}"
    optional = {"pitch": _has_pitch_control(entry["engine"], entry["voice"]), "snr_db": entry["noise"] != "none"}
    for key in ("rate", "pitch", "speed", "pad_start", "pad_end", "snr_db", "peak_dbfs"):
        value, required = entry[key], optional.get(key, True)
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if (required and not is_number) or (not required and value is not None):
            return f"field '{key}': {value!r} should be {'a number' if required else 'null'}"
    if not isinstance(entry["seed"], int) or isinstance(entry["seed"], bool) or entry["seed"] < 0:
        return f"field 'seed': {entry['seed']!r} should be a non-negative integer"
    return None


@cache
def _known_voices(engine: str) -> frozenset[str]:
    return frozenset(v for split in SPLITS for v in voice_pool(split)[engine])


def build_corpus(profile: Profile, force: bool = False, progress: bool = True) -> dict[str, Path]:
    """Make ``profile``'s synthetic corpus ready; return the manifest path of each split.

    Reads the committed recipe ``profile.recipe_dir/recipe.jsonl`` (draws and writes it if absent), synthesizes
    the audio that is missing (all of it if ``force`` or the recipe was just drawn), writes the manifests, and
    compares the audio's sha256 with ``profile.recipe_dir/sha256.txt`` (written if absent or the recipe was just
    drawn; a mismatch warns and returns normally).
    """
    corpus = profile.corpus
    if corpus is None:
        raise ValueError(f"profile {profile.name!r} has no synthetic corpus (corpus=None)")
    recipe, drawn = _load_or_make_recipe(profile)
    audio_dir = profile.data_dir / "audio"
    # Audio left from an earlier recipe may share ids with a freshly drawn one: render all of it again.
    todo = recipe if force or drawn else [u for u in recipe if not wav_path(audio_dir, u).is_file()]
    if todo:
        synthesize(todo, audio_dir, sample_rate=corpus.sample_rate, num_workers=profile.num_workers,
                   progress=progress)
    manifests = {split: profile.manifest(split) for split in SPLITS}
    if todo or not all(path.is_file() for path in manifests.values()):
        _write_manifests(recipe, audio_dir, manifests)
    _check_checksums(recipe, audio_dir, profile.recipe_dir / "sha256.txt", rewrite=drawn)
    return manifests


def wav_path(audio_dir: Path, utt: dict[str, Any]) -> Path:
    return audio_dir / utt["split"] / f"{utt['id']}.wav"


def synthesize(
    recipe: list[dict[str, Any]], audio_dir: Path, sample_rate: int = 16000, num_workers: int = 1,
    progress: bool = True,
) -> None:
    """Render every utterance of ``recipe`` to ``wav_path(audio_dir, utt)``, over ``num_workers`` processes.

    Work is cut into chunks of one engine and voice (a festival process loads its voice once per chunk).
    """
    _require_engines(recipe)
    ordered = sorted(recipe, key=lambda u: (u["engine"], u["voice"], u["id"]))
    chunks = [
        (chunk, audio_dir, sample_rate)
        for _, group in groupby(ordered, key=lambda u: (u["engine"], u["voice"]))
        for chunk in _batched(list(group), CHUNK_SIZE)
    ]
    with tqdm(total=len(recipe), unit="utt", desc="synthesize", disable=not progress) as bar:
        if num_workers <= 1 or len(chunks) == 1:
            with _single_thread():
                for args in chunks:
                    bar.update(_synthesize_chunk(args))
        else:
            # Forked workers start at once (spawned ones re-import torch for seconds) and, as torch's DataLoader
            # workers do, run torch single-threaded. An executor, not a Pool: a dying worker raises, never hangs.
            context = multiprocessing.get_context("fork")
            with ProcessPoolExecutor(num_workers, mp_context=context, initializer=torch.set_num_threads,
                                     initargs=(1,)) as executor:
                futures = [executor.submit(_synthesize_chunk, args) for args in chunks]
                try:
                    for done in as_completed(futures):
                        bar.update(done.result())
                except BaseException:
                    executor.shutdown(cancel_futures=True)  # the first error is the answer: render no more
                    raise


def engine_versions() -> dict[str, str]:
    """The line of each engine's ``--version`` banner that holds its version ('not installed' if missing)."""
    versions = {}
    for engine, binary in ENGINE_BINARIES.items():
        if shutil.which(binary) is None:
            versions[engine] = "not installed"
            continue
        result = subprocess.run([binary, "--version"], capture_output=True, text=True)
        lines = [line.strip() for line in (result.stdout + result.stderr).splitlines() if re.search(r"\d\.\d", line)]
        versions[engine] = lines[0] if lines else "unknown version"
    return versions


# ---------------------------------------------------------------------------------------------------------------
# Engines: each renders a list of utterances of one engine into (samples float64, native sample rate) pairs.


def _espeak_command(utt: dict[str, Any]) -> list[str]:
    return ["espeak-ng", "-v", utt["voice"], "-s", str(round(ESPEAK_DEFAULT_WPM * utt["rate"])),
            "-p", str(round(ESPEAK_DEFAULT_PITCH * utt["pitch"])), "--stdout", utt["text"]]


def _flite_command(utt: dict[str, Any]) -> list[str]:
    pitch = [] if utt["pitch"] is None else ["--setf", f"f0_shift={utt['pitch']}"]  # a factor on the voice's f0
    return ["flite", "-voice", utt["voice"], "--setf", f"duration_stretch={1 / utt['rate']:.4f}", *pitch,
            "-t", utt["text"], "-o", "/dev/stdout"]  # flite writes its WAV sequentially: a pipe works


def _render_each(
    command_of: Callable[[dict[str, Any]], list[str]], utts: list[dict[str, Any]]
) -> list[tuple[np.ndarray, int]]:
    """One engine process per utterance, WAV on its stdout (espeak-ng and flite start in milliseconds)."""
    rendered = []
    for utt in utts:
        result = _run_engine(utt, command_of(utt))
        rendered.append(_decode_wav(utt, result.stdout, result.stderr))
    return rendered


def _render_festival(utts: list[dict[str, Any]]) -> list[tuple[np.ndarray, int]]:
    """One festival process for all of ``utts`` (same voice): festival takes a while to start and load a voice."""
    with tempfile.TemporaryDirectory(prefix="sub8-festival-") as tmp:
        outputs = [Path(tmp) / f"{i}.wav" for i in range(len(utts))]
        script = [f"(voice_{utts[0]['voice']})"]
        for utt, out in zip(utts, outputs):
            script.append(f"(Parameter.set 'Duration_Stretch {1 / utt['rate']:.4f})")
            script.append(f"(utt.save.wave (SynthText \"{utt['text']}\") \"{out}\" 'riff)")
        script_path = Path(tmp) / "script.scm"
        script_path.write_text("\n".join(script) + "\n")
        result = _run_engine(utts[0], ["festival", "-b", str(script_path)])
        rendered = []
        for utt, out in zip(utts, outputs):
            if not out.is_file():  # a Scheme error may stop the script without a failing exit status
                raise _engine_error(utt, f"wrote no audio: {_said(result.stdout + result.stderr)}")
            rendered.append(_decode_wav(utt, out.read_bytes(), result.stdout + result.stderr))
        return rendered


_RENDERERS = {
    "espeak": partial(_render_each, _espeak_command),
    "flite": partial(_render_each, _flite_command),
    "festival": _render_festival,
}


def _run_engine(utt: dict[str, Any], command: list[str]) -> subprocess.CompletedProcess:
    """Run an engine command for ``utt`` (the first of a festival batch); raise if it cannot run or fails."""
    # Texts and voice names go on command lines and into Scheme code: no quotes, no leading dashes.
    if not _is_text(utt["text"]) or not re.fullmatch(r"[A-Za-z0-9][\w+-]*", utt["voice"]):
        raise _engine_error(utt, f"text {utt['text']!r} or voice name is not plain words")
    try:
        result = subprocess.run(command, capture_output=True)
    except FileNotFoundError:
        raise _engine_error(utt, f"{command[0]} not found on PATH") from None
    if result.returncode != 0:
        raise _engine_error(utt, f"exit status {result.returncode}: {_said(result.stderr)}")
    return result


def _decode_wav(utt: dict[str, Any], data: bytes, messages: bytes) -> tuple[np.ndarray, int]:
    """The (samples float64, sample rate) of the WAV file ``data``; ``messages``: the engine's, for errors."""
    if not data:
        raise _engine_error(utt, f"wrote no audio: {_said(messages)}")
    try:
        samples, rate = sf.read(io.BytesIO(data), dtype="float64")
    except (sf.SoundFileError, RuntimeError) as e:
        raise _engine_error(utt, f"wrote unreadable audio ({e}): {_said(messages)}") from None
    if samples.ndim != 1 or len(samples) == 0:
        raise _engine_error(utt, f"wrote audio of shape {samples.shape}; expected mono with samples")
    return samples, rate


def _said(output: bytes) -> str:
    return output.decode(errors="replace").strip() or "(no message)"


def _engine_error(utt: dict[str, Any], what: str) -> SynthesisError:
    return SynthesisError(f"utterance {utt['id']}: {utt['engine']} voice {utt['voice']}: {what}")


def _require_engines(recipe: list[dict[str, Any]]) -> None:
    needed = Counter(u["engine"] for u in recipe)
    missing = [ENGINE_BINARIES[e] for e in needed if shutil.which(ENGINE_BINARIES[e]) is None]
    if missing:
        raise SynthesisError(
            f"TTS engine(s) not found on PATH: {', '.join(missing)} (needed for "
            + ", ".join(f"{n} {e} utterances" for e, n in needed.items()) + "). Install the Debian packages "
            "espeak-ng, flite, festival, festvox-kallpc16k, festvox-kdlpc16k, festvox-us-slt-hts (make setup does)."
        )


# ---------------------------------------------------------------------------------------------------------------
# Signal processing: speed perturbation, padding, noise, level.


def _perturb(speech: np.ndarray, native_rate: int, utt: dict[str, Any], sample_rate: int) -> np.ndarray:
    """(n,) float64 engine output at ``native_rate`` -> (m,) float64 final waveform at ``sample_rate``."""
    # Playing native-rate samples as if recorded at native_rate * speed makes them speed times faster.
    source_rate = round(native_rate * utt["speed"] / SPEED_RATE_QUANTUM_HZ) * SPEED_RATE_QUANTUM_HZ
    if source_rate != sample_rate:
        speech = AF.resample(torch.from_numpy(speech), source_rate, sample_rate).numpy()
    pads = (round(utt["pad_start"] * sample_rate), round(utt["pad_end"] * sample_rate))
    signal = np.pad(speech, pads)
    if utt["noise"] != "none":
        noise = _colored_noise(utt["noise"], len(signal), np.random.default_rng(utt["seed"]))
        # SNR against the speech itself, not the padded signal, so padding does not change how loud noise is.
        speech_power = np.mean(speech**2)
        noise_power = np.mean(noise**2)
        signal = signal + noise * np.sqrt(speech_power / (noise_power * 10 ** (utt["snr_db"] / 10)))
    peak = np.max(np.abs(signal))
    if peak == 0:
        raise _engine_error(utt, "rendered only silence")
    signal = signal * (10 ** (utt["peak_dbfs"] / 20) / peak)
    # Its own random stream of the utterance's seed, so the floor does not shift the added noise above.
    floor = np.random.default_rng([utt["seed"], 1]).standard_normal(len(signal))
    return signal + floor * 10 ** (NOISE_FLOOR_DBFS / 20)


def _colored_noise(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n,) noise with power spectrum 1/f^0 (white), 1/f (pink) or 1/f^2 (brown), zero mean."""
    if kind == "white":
        return rng.standard_normal(n)
    exponent = {"pink": 0.5, "brown": 1.0}[kind]  # amplitude exponent: power falls as f^(-2 * exponent)
    n_fft = 1 << (n - 1).bit_length()  # a power of two: an FFT of a length with large prime factors is slow
    spectrum = np.fft.rfft(rng.standard_normal(n_fft))
    freqs = np.fft.rfftfreq(n_fft)
    spectrum[1:] /= freqs[1:] ** exponent
    spectrum[0] = 0.0
    return np.fft.irfft(spectrum, n_fft)[:n]


def _synthesize_chunk(args: tuple[list[dict[str, Any]], Path, int]) -> int:
    """Render and save one chunk (one engine and voice); return how many files it wrote."""
    utts, audio_dir, sample_rate = args
    for utt, (speech, native_rate) in zip(utts, _RENDERERS[utts[0]["engine"]](utts)):
        save_wav(wav_path(audio_dir, utt), _perturb(speech, native_rate, utt, sample_rate), sample_rate)
    return len(utts)


@contextmanager
def _single_thread() -> Iterator[None]:
    """Run torch single-threaded, as the workers do, so serial and parallel runs give the same samples."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------------------
# Recipe, manifests, checksums.


def _load_or_make_recipe(profile: Profile) -> tuple[list[dict[str, Any]], bool]:
    """The profile's recipe, and whether it was just drawn (no committed one)."""
    path = profile.recipe_dir / "recipe.jsonl"
    if not path.is_file():
        recipe = make_recipe(profile.corpus)
        write_recipe(path, recipe)
        return recipe, True
    recipe = read_recipe(path)
    found = Counter(u["split"] for u in recipe)
    expected = _split_sizes(profile.corpus)
    if any(found[s] != expected[s] for s in SPLITS):
        raise ValueError(
            f"{path} holds {dict(found)} utterances per split, but profile {profile.name!r} asks for {expected}; "
            "delete the recipe to draw a new one"
        )
    return recipe, False


def _write_manifests(recipe: list[dict[str, Any]], audio_dir: Path, manifests: dict[str, Path]) -> None:
    for split, path in manifests.items():
        utterances = []
        for u in (u for u in recipe if u["split"] == split):
            audio_path = wav_path(audio_dir, u)
            utterances.append(
                Utterance(
                    utt_id=u["id"],
                    audio_filepath=audio_path,
                    duration=audio_info(audio_path).duration,
                    text=u["text"],
                    speaker=f"{u['engine']}:{u['voice']}",
                    extra={"engine": u["engine"], "voice": u["voice"], "noise": u["noise"], "snr_db": u["snr_db"]},
                )
            )
        write_manifest(path, utterances)


def _check_checksums(recipe: list[dict[str, Any]], audio_dir: Path, checksum_path: Path, rewrite: bool) -> None:
    """Write ``checksum_path`` (``sha256sum`` format, paths relative to ``audio_dir``) if absent or ``rewrite``,
    else warn where the audio differs from it."""
    lines = sorted(
        (u["id"], f"{hashlib.sha256(wav_path(audio_dir, u).read_bytes()).hexdigest()}  {u['split']}/{u['id']}.wav")
        for u in recipe
    )
    current = dict(lines)
    if rewrite or not checksum_path.is_file():
        atomic_write_text(checksum_path, "".join(line + "\n" for _, line in lines))
        return
    committed = {Path(line.split("  ", 1)[-1]).stem: line for line in checksum_path.read_text().splitlines()}
    differing = sorted(i for i in current.keys() | committed.keys() if current.get(i) != committed.get(i))
    if differing:
        versions = "; ".join(f"{engine}: {version}" for engine, version in engine_versions().items())
        warnings.warn(
            f"\n{'!' * 100}\n{len(differing)} of {len(current)} synthesized files differ from {checksum_path} "
            f"(first: {', '.join(differing[:MAX_LISTED_IDS])}).\nThey were rendered from the committed recipe, so most "
            f"likely a different engine version (or platform) renders different samples: results may differ "
            f"slightly from the committed ones. (A file changed by hand is rendered again by "
            f"build_corpus(profile, force=True).)\nEngines here: {versions}\n{'!' * 100}",
            stacklevel=3,
        )


# ---------------------------------------------------------------------------------------------------------------
# Small helpers.


def _split_sizes(corpus: CorpusConfig) -> dict[str, int]:
    return {"train": corpus.n_train, "dev": corpus.n_dev, "test": corpus.n_test}


def _holdout_rank(split: str) -> int:
    if split not in HOLDOUT_ORDER:
        raise ValueError(f"unknown split {split!r}; choose one of {list(HOLDOUT_ORDER)}")
    return HOLDOUT_ORDER.index(split)


def _has_pitch_control(engine: str, voice: str) -> bool:
    return engine == "espeak" or (engine == "flite" and voice not in FLITE_PITCHLESS_VOICES)


def _uniform(rng: np.random.Generator, bounds: tuple[float, float], decimals: int = 3) -> float:
    # Rounded so the committed recipe stays readable and reproduces exactly from its JSON text.
    return round(float(rng.uniform(*bounds)), decimals)


def _is_text(text: Any) -> bool:
    return isinstance(text, str) and TEXT_PATTERN.fullmatch(text) is not None


def _batched(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]
