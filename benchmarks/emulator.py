"""Integer inference of the test split on this CPU (sub8.emulator.program): real-time factor, and its ratio to fp32
PyTorch greedy decoding of the same utterances, measured in one run (issue 7's target: emulator RTF <= 0.05 on the
default profile).

    .venv/bin/python benchmarks/emulator.py [--profile default] [--model rnnt_small] [--threads 1] [--limit N]

The integer program is the one notebook 06 decodes: the model's 8-bit uniform QAT run (``<model>-
uniform_per_channel-8b``, notebook 03) converted by ``to_integer_program`` and calibrated on 32 dev utterances; if
that run does not exist, the fp32 baseline quantized post-training per channel at 8 bits (the program's speed
depends on the shapes and the emitted tokens, not on how its int8 weights were found). The float side is the fp32
baseline (notebook 01) in PyTorch. Both decode the same utterances with ``sub8.evaluate.decode`` (the profile's
decoding batches, shortest first), timed once each, wall clock; the conversion is timed apart and not counted.

RTF = decoding seconds ÷ seconds of audio (feature frames × 10 ms). ``--threads`` bounds torch's threads and, set
before numpy loads, the BLAS/OpenMP threads (the integer program's matmuls run in numpy's float64 BLAS): 1 by default,
the per-core figure the target is about.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="default")
    parser.add_argument("--model", default="rnnt_small", help="an RNN-T baseline of the profile")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--limit", type=int, default=None, help="only the first N test utterances")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)  # before numpy and torch load their thread pools

    import torch

    from sub8 import profiles
    from sub8.data.features import FeatureSet
    from sub8.data.prepare import prepare_data
    from sub8.device_study import RunSpec, load_run, run_exists, split_durations_s
    from sub8.emulator.program import calibration_features, to_integer_program
    from sub8.evaluate import decode, score_feature_set
    from sub8.experiment import load_model
    from sub8.quant import QuantPlan, UniformQuantizer, export_quantized, hard_quantize_, plan_quantizers

    if args.profile not in profiles.PROFILES:
        sys.exit(f"unknown profile {args.profile!r}; one of {sorted(profiles.PROFILES)}")
    torch.set_num_threads(args.threads)
    prof = profiles.get(args.profile)
    data = prepare_data(prof)
    baseline = load_model(prof, args.model)
    if baseline.config.encoder != "lstm":
        sys.exit(f"{args.model} is not an RNN-T: the integer program converts the RNN-T only")

    spec = RunSpec.parse(args.model, "uniform_per_channel-8b")
    if run_exists(prof, spec):
        quantized, exported, _, _ = load_run(prof, spec)
        source = spec.name
    else:
        quantized = load_model(prof, args.model)
        quantizers = plan_quantizers(quantized, QuantPlan.uniform(8), lambda bits: UniformQuantizer(bits))
        hard_quantize_(quantized, quantizers)
        exported = export_quantized(quantized, quantizers)
        source = f"{args.model} quantized post-training (per channel, 8 bits): {spec.name} not found"

    fs = data.features["test"]
    if args.limit is not None:
        n = min(args.limit, len(fs))
        end = int(fs.offsets[n])
        fs = FeatureSet(fs.feats[:end], fs.offsets[: n + 1], fs.utt_ids[:n], fs.texts[:n], fs.meta[:n])
    audio_s = float(split_durations_s(data)[: len(fs)].sum())

    t0 = time.perf_counter()
    program = to_integer_program(quantized, exported, calibration_features(data.features["dev"], data.cmvn))
    convert_s = time.perf_counter() - t0

    def timed(model: torch.nn.Module) -> tuple[float, list[str]]:
        start = time.perf_counter()
        hyps = decode(model, fs, data.cmvn, data.tokenizer, prof.eval_batch_frames)
        return time.perf_counter() - start, hyps

    fp32_s, fp32_hyps = timed(baseline)
    int_s, int_hyps = timed(program)
    fp32_wer, int_wer = score_feature_set(fs, fp32_hyps).wer, score_feature_set(fs, int_hyps).wer

    print(f"profile {prof.name}, {args.threads} thread(s); {len(fs)} test utterances, {audio_s:.0f} s of audio")
    print(f"integer program of {source} (converted and calibrated in {convert_s:.1f} s, not counted)")
    label = f"fp32 PyTorch ({args.model})"
    width = max(len(label), len("integer program"))
    print(f"{'':{width}s} {'seconds':>9s} {'RTF':>8s} {'WER %':>7s}")
    print(f"{label:{width}s} {fp32_s:9.2f} {fp32_s / audio_s:8.4f} {fp32_wer:7.2f}")
    print(f"{'integer program':{width}s} {int_s:9.2f} {int_s / audio_s:8.4f} {int_wer:7.2f}")
    print(f"integer ÷ fp32 time: {int_s / fp32_s:.2f}")


if __name__ == "__main__":
    main()
