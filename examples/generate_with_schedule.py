"""Sample from SmolLM2-135M under an entropy-matched schedule (`calibrated-sampling fit --out FILE.json`):

    python examples/generate_with_schedule.py [SCHEDULE_FILE]

The schedule file holds the per-bin weights, its length T and which F it uses; it is refused for another
model, tokenizer or head. The default is the per-step temperature schedule (as fast as plain sampling);
schedules/smollm2-135m-pydoc-256-lookahead-alpha.json is the lookahead's (F: the exact one-step lookahead),
the one method that beats temperature at equal entropy here, at 4 times the time per token on a CPU. Generations longer than T are refused too (past_schedule="base" samples the
base model after T instead).
"""
import sys

import torch
from transformers import LogitsProcessorList

from calibrated_sampling import load_model
from calibrated_sampling.schedule import load_schedule, schedule_calibrator

path = sys.argv[1] if len(sys.argv) > 1 else "schedules/smollm2-135m-pydoc-256-temperature.json"
model, tokenizer = load_model("smollm2-135m")
schedule = load_schedule(path, model, tokenizer)
calibrator = schedule_calibrator(schedule, model)
inputs = tokenizer("The with statement is used to", return_tensors="pt").to(model.device)
torch.manual_seed(0)
with calibrator.attached(model):  # hooks on the output embedding (a head's F reads the hidden state)
    # Plain sampling settings, so that q is exactly the schedule's distribution.
    out = model.generate(**inputs, do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                         max_new_tokens=schedule.max_new_tokens, logits_processor=LogitsProcessorList([calibrator]))
print(tokenizer.decode(out[0], skip_special_tokens=True))
