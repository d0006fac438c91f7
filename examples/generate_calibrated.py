"""Sample from SmolLM2-135M with a fitted future-entropy calibration: python examples/generate_calibrated.py [HEAD_DIR]"""
import sys

import torch
from transformers import LogitsProcessorList

from calibrated_sampling import FutureEntropyCalibrator, load_model

head_dir = sys.argv[1] if len(sys.argv) > 1 else "heads/smollm2-135m"
model, tokenizer = load_model("smollm2-135m")
calibrator = FutureEntropyCalibrator.from_pretrained(head_dir, model, tokenizer)  # refuses a head without a fit
inputs = tokenizer("It is a truth universally acknowledged that", return_tensors="pt").to(model.device)
torch.manual_seed(0)
with calibrator.attached(model):
    out = model.generate(**inputs, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                         max_new_tokens=calibrator.max_new_tokens, logits_processor=LogitsProcessorList([calibrator]))
print(tokenizer.decode(out[0], skip_special_tokens=True))
