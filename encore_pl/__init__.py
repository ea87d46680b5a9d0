"""encore-pl: lifelong sequential knowledge editing (ENCORE, MEMIT, AlphaEdit) on PyTorch Lightning.

The Python API (none of it imports Lightning):

    model, tokenizer = encore_pl.load_model("smollm2-135m")          # or any HF causal LM you loaded
    config = encore_pl.EditorConfig.from_yaml("configs/smollm2-135m/encore.yaml")
    requests = encore_pl.load_requests(path, format="easyedit")
    editor = encore_pl.Editor(model, tokenizer, config)                # edits `model` in place
    editor.edit(requests, batch_size=25)
    editor.evaluate(requests)
    editor.save("my-edits")                                            # patch + lifelong state
    later = encore_pl.Editor.load("my-edits", model2, tokenizer2)      # continues the stream
    encore_pl.apply_patch(model3, "my-edits/edits.safetensors")        # and revert_patch

Runs from YAML configs: `encore-pl fit --config ...` (Lightning; see README).
"""

from .data import EditRequest, load_requests
from .editor import Editor, EditorConfig, LifelongState
from .evaluation import EvaluationConfig
from .models import load_model_and_tokenizer as load_model
from .patches import apply_patch, revert_patch
from .solvers import SolverConfig
from .stats import KeyStatistics
from .target_vectors import TargetOptimization

__all__ = [
    "EditRequest", "Editor", "EditorConfig", "EvaluationConfig", "KeyStatistics", "LifelongState", "SolverConfig",
    "TargetOptimization", "apply_patch", "load_model", "load_requests", "revert_patch",
]
