"""llmkit.train (survey §4.3): the one trainer, its objectives, optimisers, schedules and checkpoints.

    from llmkit.train import Trainer, TrainConfig, load_recipe, lm_loss
    Trainer(model, TrainConfig(...), train_loader, loss_fn=lm_loss, out_dir="runs/x").fit()

See `llmkit.train.trainer` for the full API (the contract that adaptation methods build on).
"""
from .config import Recipe, TrainConfig, load_recipe
from .objectives import lm_loss, make_loss_fn
from .trainer import Trainer

__all__ = ["Trainer", "TrainConfig", "Recipe", "load_recipe", "lm_loss", "make_loss_fn"]
