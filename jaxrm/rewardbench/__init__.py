"""RewardBench and RewardBench 2: the benchmarks' scoring rules (`rules`), their rows (`data`),
scoring a model on them (`run`, also during training) and the results for people (`report`).
`python -m jaxrm.evaluate` is the command."""
