"""The learning rate and clip norm DP training defaults to, and the measurement behind them.

Kept apart from the planner so that the configuration can default to them without importing
the accountant (and torch) on every ``fedtune --help``.

The study's sweep (``benchmarks/dp_utility_study.py --parts sweep`` on a GPU; 800 demo
hospital examples, epsilon 8, AdamW, B-only LoRA r=8 on q/v, logical batch 64, 3 epochs,
held-out loss gain from a base of 3.23; ``benchmarks/results/dp_utility_study_gpu.json``)
gained most at learning rate 0.03 with clip 0.1 (1.58) against 0.01 (1.10) and 0.1 (1.47);
clip 0.1 beat clip 1.0 at each rate (at 0.03: 1.58 against 1.49); the earlier defaults, 0.01
and clip 1.0, gained 0.99. Small clips are the field's advice too (Li et al. 2022: 0.1).
Without DP the rate barely mattered (0.03: 3.05, 0.1: 3.06). One seed per setting.
"""

DP_LEARNING_RATE = 3e-2
DP_MAX_GRAD_NORM = 0.1

# GRPO's default learning rate (training.method = "grpo" without a learning_rate): the SFT
# rates above wreck a GRPO policy. Measured with ``benchmarks/grpo_utility.py`` (SmolLM2-135M,
# bank prompts, AdamW, LoRA r=8, from a cold start whose held-out reward was 0.94 of 2):
# one non-private round of 4 steps at 1e-2 took the held-out reward to 0 (no completion kept
# the <answer> format; results/grpo_utility_lr1e-2.json), while 3 steps at 1e-3 kept it
# (results/grpo_utility.json). GRPO's usual rates are lower still (TRL's examples: 1e-6 to
# 1e-5, full weights, hundreds of steps).
GRPO_LEARNING_RATE = 1e-3
