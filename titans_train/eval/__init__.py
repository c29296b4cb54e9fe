"""Evaluation: held-out perplexity by position and long-context retrieval tasks (docs/evals.md).

`titans-train eval SOURCE --tasks ppl,niah,...` (`cli.py`) loads any model this project writes
(`source.py`), runs the tasks on any tp x dp layout with the same numbers (`distributed.py` splits
the work and reduces it), and reports them (`report.py`). The training loop runs the same tasks
every `train.eval_interval` steps (`train.eval_tasks`, `during_training.py`).
"""

# The task names, here so config validation can check them without importing torch.
TASKS = ("ppl", "niah", "babilong", "mqar")
