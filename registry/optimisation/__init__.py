"""Prompt optimisation as a job: generate prompt candidates, search them under a budget, prove the winner.

* `search.py`     the split of a dataset into search, few-shot pool and held-out items (seeded hashing of item
                  keys), the budget, and successive halving over candidates — plain Python, no Django;
* `operators.py`  candidate generation: instruction edits, few-shot selection and ordering, meta-prompting
                  (the model proposes rewrites through a callable the worker backs with the engine) — plain
                  Python, no Django;
* `jobs.py`       the OptimisationJob state machine on top of evaluation runs, the held-out comparison, the
                  winner version and the label move;
* `reporting.py`  spending, progress, the report document and its text, the winner's commit message.
"""
