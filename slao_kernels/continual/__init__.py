"""Continual learning over a LoRA-patched model: strategies, task streams, training, metrics, the runner.

  SLAO, merge_weight              the SLAO controller (slao.py)
  Strategy, make_strategy, ...    the strategy interface and registry of the runner (strategies/)
  Task, Example, load_task_dir,   task streams: CL_Benchmark directories, Hugging Face datasets,
  load_hf_task, generated_suite,  the built-in generated suite, the literature's task orders
  ORDERS
  PromptEncoder                   prompts and answers as token ids (prompts.py)
  evaluate_task, score_options    exact option scoring -> accuracy (evaluate.py)
  TrainConfig, train_task         the training loop of one task (train.py)
  cl_metrics                      AA, BWT, FWT, forgetting (metrics.py)
  RunConfig, run_stream           the runner (runner.py)
  SLAOCallback                    SLAO inside a transformers.Trainer (callback.py; imports transformers)
  models.load_model, ...          the embedded SmolLM2 GGUF and local models (models.py; import the module)
"""

from slao_kernels.continual.evaluate import evaluate_task, score_options
from slao_kernels.continual.metrics import cl_metrics
from slao_kernels.continual.prompts import PromptEncoder
from slao_kernels.continual.runner import RunConfig, run_stream
from slao_kernels.continual.slao import SLAO, merge_weight
from slao_kernels.continual.strategies import STRATEGIES, SeqLoRA, SLAOStrategy, Strategy, make_strategy
from slao_kernels.continual.tasks import ORDERS, Example, Task, generated_suite, load_hf_task, load_task_dir
from slao_kernels.continual.train import TrainConfig, train_task

__all__ = ["ORDERS", "STRATEGIES", "SLAO", "Example", "PromptEncoder", "RunConfig", "SLAOCallback", "SLAOStrategy",
           "SeqLoRA", "Strategy", "TrainConfig", "Task", "cl_metrics", "evaluate_task", "generated_suite",
           "load_hf_task", "load_task_dir", "make_strategy", "merge_weight", "run_stream", "score_options",
           "train_task"]


def __getattr__(name):
    """``SLAOCallback``, imported on first access (it imports transformers)."""
    if name == "SLAOCallback":  # imports transformers: only when asked for
        from slao_kernels.continual.callback import SLAOCallback

        return SLAOCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
