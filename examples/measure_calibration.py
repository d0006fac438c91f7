"""Does the default model's entropy drift on its own text? Base sampling vs temperature 0.9."""

from calibrated_sampling import load_documents, load_model, make_windows, measure

model, tokenizer = load_model("smollm2-135m")  # packaged GGUF, converted once and cached
windows = make_windows(load_documents("pydoc"), tokenizer, num_prompts=4, continuation_tokens=64)
results = measure(model, tokenizer, windows, ["base", "temperature=0.9"], batch_size=4)
for spec, r in results.items():
    print(f"{spec:16s} log loss {r['log_loss']:.3f}  generation entropy {r['gen_entropy']:.3f}  EntCE {r['entce']:+.3f}")
