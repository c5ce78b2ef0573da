"""The RNN-T as int8 QDQ ONNX in ONNX Runtime on this CPU (sub8.emulator.onnx_export): a real measured latency beside
the accelerator model's, against fp32 PyTorch and fp32 ONNX, measured in one run on the same utterances.

    .venv/bin/python benchmarks/onnx_runtime.py [--profile default] [--models rnnt_small rnnt_large]
                                                [--utterances 200] [--threads 1] [--out DIR]

Per model, the quantized run is the profile's ``rnnt_small-uniform_per_channel-8b`` / ``rnnt_large-s8bqat-5b``
(notebook 03); the fp32 side is the trained baseline (notebook 01). Where a run is missing, the benchmark says so and
uses a randomly initialised model of the baseline's architecture (benchmarks/common.py), quantized post-training
per channel at 8 bits: the speed depends on the shapes and the emitted tokens, not on how the weights were found,
but the WERs of such a model mean nothing. The ONNX models are calibrated on 32 dev utterances (as the integer
program is) and written to ``--out`` (a temporary directory by default).

Rows, each decoding the same utterances (evenly spaced over the test split, so short and long ones) **one at a
time** (batch 1: the on-device case; greedy search, encoder over the whole utterance), timed wall clock after one
warm-up utterance, the systems taking turns utterance by utterance (a change in the machine's load hits them
alike), the export not counted:

* fp32 PyTorch: the baseline's ``greedy_decode``.
* fake-quant PyTorch: the quantized run (float weights on the int8 grid): the WER the ONNX model should match.
* fp32 ONNX: the baseline exported without quantization (``export_onnx_fp32``), ONNX ``LSTM``.
* int8 ONNX (DynamicQuantizeLSTM) and int8 ONNX (LSTM): the QDQ export with each LSTM op.
* accelerator model: the modelled RTF of the quantized run on the device preset (``sub8.emulator.device``, the same
  utterances and the int8 ONNX hypotheses' token counts), for scale — a different machine, not a measurement.

ms/utt is the mean decoding time per utterance; RTF = decoding seconds ÷ audio seconds (feature frames × 10 ms);
``= fake-quant`` the share of utterances whose hypothesis is the fake-quant model's, word for word.
``--threads`` sets torch's, ORT's intra-op and the BLAS/OpenMP threads (1 by default: the per-core figure).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

RUNS = {"rnnt_small": "uniform_per_channel-8b", "rnnt_large": "s8bqat-5b"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="default")
    parser.add_argument("--models", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--utterances", type=int, default=200, help="test utterances, evenly spaced")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="where the ONNX files go (default: a temp dir)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)  # before numpy and torch load their thread pools

    import numpy as np
    import torch

    from common import baseline_model
    from sub8 import profiles
    from sub8.data.prepare import prepare_data
    from sub8.device_study import MAX_AUDIO_S, RunSpec, load_run, run_exists
    from sub8.emulator import device as dev
    from sub8.emulator import onnx_export as ox
    from sub8.emulator.program import calibration_features
    from sub8.evaluate import score
    from sub8.experiment import load_model
    from sub8.quant import QuantPlan, UniformQuantizer, export_quantized, hard_quantize_, plan_quantizers

    if args.profile not in profiles.PROFILES:
        sys.exit(f"unknown profile {args.profile!r}; one of {sorted(profiles.PROFILES)}")
    torch.set_num_threads(args.threads)
    prof = profiles.get(args.profile)
    data = prepare_data(prof)
    fs = data.features["test"]
    picks = np.unique(np.linspace(0, len(fs) - 1, min(args.utterances, len(fs))).round().astype(int))
    feats = [data.cmvn.apply(fs.feature(int(i))) for i in picks]
    refs = [fs.texts[int(i)] for i in picks]
    durations = np.array([len(f) for f in feats]) * prof.features.frame_shift_ms / 1000.0
    audio_s = float(durations.sum())
    calibration = calibration_features(data.features["dev"], data.cmvn)
    print(f"profile {prof.name}, {args.threads} thread(s); {len(picks)} test utterances one at a time, "
          f"{audio_s:.0f} s of audio (mean {1e3 * audio_s / len(picks):.0f} ms)")

    def timed(decoders: dict[str, Callable[[torch.Tensor], list[int]]]) -> dict[str, tuple[float, list[str]]]:
        """Per decoder, seconds to decode every utterance alone (after one warm-up) and the hypotheses' text. The
        decoders take turns utterance by utterance, so a change in the machine's load affects them alike."""
        seconds = dict.fromkeys(decoders, 0.0)
        hyps: dict[str, list[str]] = {label: [] for label in decoders}
        for label, decode_one in decoders.items():
            decode_one(feats[0])
        for f in feats:
            for label, decode_one in decoders.items():
                start = time.perf_counter()
                ids = decode_one(f)
                seconds[label] += time.perf_counter() - start
                hyps[label].append(data.tokenizer.decode(ids))
        return {label: (seconds[label], hyps[label]) for label in decoders}

    def torch_decoder(model: torch.nn.Module):
        model.eval()

        def decode_one(f: torch.Tensor) -> list[int]:
            with torch.inference_mode():
                return model.greedy_decode(f[None], torch.tensor([len(f)]))[0]
        return decode_one

    def onnx_decoder(files: ox.OnnxRnnt):
        runner = ox.OnnxTransducer(files, threads=args.threads)
        return lambda f: runner.greedy_decode(f[None].numpy(), np.array([len(f)]))[0]

    out_root = args.out or Path(tempfile.mkdtemp(prefix="sub8_onnx_"))
    for name in args.models:
        spec = RunSpec.parse(name, RUNS[name])
        if run_exists(prof, spec) and run_exists(prof, RunSpec.parse(name, "fp32")):
            baseline = load_model(prof, name)
            quantized, exported, _, _ = load_run(prof, spec)
            source = f"trained runs {name} (fp32) and {spec.name}"
        else:
            baseline = baseline_model(prof, name)
            quantized = baseline_model(prof, name)
            quantizers = plan_quantizers(quantized, QuantPlan.uniform(8), lambda bits: UniformQuantizer(bits))
            hard_quantize_(quantized, quantizers)
            exported = export_quantized(quantized, quantizers)
            source = (f"RANDOMLY INITIALISED {name} architecture ({spec.name} or {name} not found under "
                      f"{prof.runs_dir / 'models'}), quantized post-training per channel at 8 bits: WERs meaningless")
        prefix = out_root / name
        t0 = time.perf_counter()
        int8 = {op: ox.export_onnx_qdq(quantized, exported, calibration, f"{prefix}.int8_{op}", lstm_op=op)
                for op in ox.LSTM_OPS}
        fp32 = ox.export_onnx_fp32(baseline, f"{prefix}.fp32")
        export_s = time.perf_counter() - t0

        rows = timed({"fp32 PyTorch": torch_decoder(baseline), "fake-quant PyTorch": torch_decoder(quantized),
                      "fp32 ONNX": onnx_decoder(fp32),
                      **{f"int8 ONNX ({op})": onnx_decoder(files) for op, files in int8.items()}})

        tokens = [len(h.split()) for h in rows["int8 ONNX (DynamicQuantizeLSTM)"][1]]
        work = dev.workload(quantized, exported, max_audio_s=max(MAX_AUDIO_S, math.ceil(float(durations.max()))))
        config = dev.PRESETS[dev.DEFAULT_PRESET]
        modelled = dev.simulate(work, config, [dev.Utterance(float(d), t) for d, t in zip(durations, tokens)])

        print(f"\n{name}: {source}; ONNX export {export_s:.1f} s (not counted), files {prefix}.*.onnx")
        width = max(map(len, rows))
        fp32_torch, fp32_onnx = rows["fp32 PyTorch"][0], rows["fp32 ONNX"][0]
        fake_quant = rows["fake-quant PyTorch"][1]
        print(f"{'':{width}s} {'ms/utt':>8s} {'RTF':>8s} {'WER %':>7s} {'= fake-quant':>13s} "
              f"{'÷ fp32 PyTorch':>15s} {'÷ fp32 ONNX':>12s}")
        for label, (seconds, hyps) in rows.items():
            wer = score(refs, hyps).wer
            same = np.mean([a == b for a, b in zip(hyps, fake_quant)])
            print(f"{label:{width}s} {1e3 * seconds / len(feats):8.2f} {seconds / audio_s:8.4f} {wer:7.2f} "
                  f"{same:13.1%} {seconds / fp32_torch:15.2f} {seconds / fp32_onnx:12.2f}")
        print(f"{'accelerator model':{width}s} {1e3 * modelled.compute_s.mean():8.2f} {modelled.rtf:8.4f} "
              f"{'':7s} (preset {config.name}, modelled; UPL p90 {modelled.upl_ms_p90:.1f} ms)")
        for op, files in int8.items():
            ops = {part: ox.optimized_op_counts(path, part) for part, path in files.paths().items()}
            fused = ", ".join(f"{part}: " + " ".join(f"{k}×{v}" for k, v in sorted(counts.items())
                                                      if k in ("MatMulIntegerToFloat", "QGemm", "MatMul", "Gemm",
                                                               "DynamicQuantizeLSTM", "LSTM"))
                              for part, counts in ops.items())
            print(f"ORT runs (int8, {op}): {fused}")


if __name__ == "__main__":
    main()
