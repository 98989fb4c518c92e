"""SLAO inside an existing Hugging Face training script: a ``TrainerCallback``.

One ``trainer.train()`` is one task: the callback calls
:meth:`SLAO.begin_task` when training begins and :meth:`SLAO.end_task` when it
ends, so after ``train()`` returns the model holds the merged adapter::

    patch_llama(model, LoRAConfig(rank=8, targets=("q_proj", "v_proj")))
    slao = SLAO(model)
    for dataset in task_datasets:
        trainer = Trainer(model=model, args=args, train_dataset=dataset,
                          callbacks=[SLAOCallback(slao)])   # a new Trainer (and optimizer) per task
        trainer.train()
        trainer.evaluate(...)                               # sees the merged adapter

Use a new ``Trainer`` per task: the Trainer builds its optimizer and learning-rate
schedule once and keeps them across ``train()`` calls. If one Trainer is
reused anyway, the callback clears the optimizer's state (Adam moments) at the
start of every task so none leaks from the previous task; the schedule is
the Trainer's business and is not reset.
"""

from __future__ import annotations

from transformers import TrainerCallback

from slao_kernels.continual.slao import SLAO


class SLAOCallback(TrainerCallback):
    """Begins a SLAO task at ``on_train_begin`` and ends it at ``on_train_end``.

    Args:
        slao: the controller over the model the Trainer trains.
    """

    def __init__(self, slao: SLAO):
        if not isinstance(slao, SLAO):
            raise TypeError(f"SLAOCallback needs a slao_kernels.SLAO controller, got {type(slao).__name__}")
        self.slao = slao
        self.lambdas: list[float] = []  # λ(i) of every finished task

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.slao.begin_task()
        while optimizer is not None and not hasattr(optimizer, "state") and hasattr(optimizer, "optimizer"):
            optimizer = optimizer.optimizer  # accelerate wraps the torch optimizer
        if optimizer is not None and getattr(optimizer, "state", None):
            optimizer.state.clear()  # a reused Trainer: no moments from the previous task
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.lambdas.append(self.slao.end_task())
        return control
