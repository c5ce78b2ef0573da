"""Speech data: the synthetic corpus, LibriSpeech import, manifests, features, tokenizers and batching."""
