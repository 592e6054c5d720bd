"""Choosing how much to prune where (``tp.search``): sensitivity analysis, budget search,
latency-aware rounding and the never-slower guard.

```python
table = tp.search.sensitivity(model, x, eval_fn)                 # one unit alone, several ratios
result = tp.search.search(model, x, eval_fn, tp.search.Target("macs", 0.5), runtime="torch")
tp.search.save_result(result, "net.safetensors")                 # + net.plan.json, net.search.json
```
"""

from torchslim.graph.checkpoint import Checkpoint, trial
from torchslim.search.budget import Budget, Target, TargetUnreachable, greedy_path, search_ratios
from torchslim.search.guard import Verdict, guard
from torchslim.search.metrics import after_finetune, output_agreement, short_finetune
from torchslim.search.pipeline import SearchResult, search
from torchslim.search.report import (
    plot_sensitivity,
    save_result,
    search_markdown,
    sensitivity_markdown,
)
from torchslim.search.rounding import candidate_counts, latency_aware_rounding
from torchslim.search.runtime import Runtime
from torchslim.search.sensitivity import Sensitivity, Trial, analyse, sensitivity
from torchslim.search.space import SearchSpace, Unit, evaluate, keep_ratio
from torchslim.search.timings import TimingTable

__all__ = [
    "Budget",
    "Checkpoint",
    "Runtime",
    "TimingTable",
    "SearchResult",
    "SearchSpace",
    "Sensitivity",
    "Target",
    "TargetUnreachable",
    "Trial",
    "Unit",
    "Verdict",
    "after_finetune",
    "analyse",
    "candidate_counts",
    "evaluate",
    "greedy_path",
    "guard",
    "keep_ratio",
    "latency_aware_rounding",
    "output_agreement",
    "plot_sensitivity",
    "save_result",
    "search",
    "search_markdown",
    "search_ratios",
    "sensitivity",
    "sensitivity_markdown",
    "short_finetune",
    "trial",
]
