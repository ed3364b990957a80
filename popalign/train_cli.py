"""``python train.py fit --config configs/sdxl_popalign.yaml``: the LightningCLI of popalign.

The CLI's schema is the typed ``__init__`` of :class:`popalign.module.PopAlignModule` (``model:``) and of
:class:`popalign.data.datamodule.PopulationDataModule` (``data:``); ``--print_config`` shows every knob.
Configs are parsed in omegaconf mode, so values may interpolate (``${data.init_args.pairs_per_group}``).
"""

from __future__ import annotations

import difflib
import logging
import re
import signal
import sys
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path

import yaml
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from popalign.checkpointing import (
    CKPT_NAMES,
    FinalStepCheckpoint,
    check_ckpt_path,
    prepare_checkpointing,
    refuse_earlier_checkpoints,
)
from popalign.cli import quiet_torchvision_advice
from popalign.data.datamodule import PopulationDataModule
from popalign.data.shards import expand_shards
from popalign.distributed import BlockFSDPStrategy, register_strategy
from popalign.errors import UserError, first_line
from popalign.module import PopAlignModule
from popalign.preemption import add_agreed_sigterm_stop, sigterm_noted
from popalign.progress_bars import tidy_progress_bars
from popalign.resume import check_before_fit, last_checkpoint
from popalign.signals import lightning_interrupt

# the frozen reference is in eval mode on purpose; shards have a length only to size epochs
warnings.filterwarnings("ignore", r"Found \d+ module\(s\) in eval mode")
warnings.filterwarnings("ignore", r"Your `IterableDataset` has `__len__` defined")
# validation runs only when val_shards are given; Lightning's own use of a torch API it deprecated
warnings.filterwarnings("ignore", r"You defined a `validation_step` but have no `val_dataloader`")
warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated")
# --ckpt_path last before the first checkpoint: before_fit says so in its own words
warnings.filterwarnings("ignore", r'\.fit\(ckpt_path="last"\) is set, but there is no last checkpoint')
# on every resume: the folder is fixed on purpose, and a fresh run into one holding checkpoints is
# refused before this point (refuse_earlier_checkpoints)
warnings.filterwarnings("ignore", r"Checkpoint directory .* exists and is not empty")
# the module clips with its own hook, and under DeepSpeed it leaves clipping to DeepSpeed, which
# Lightning hands trainer.gradient_clip_val (OptimizerHooks.optimizer_step)
warnings.filterwarnings("ignore", r"Since DeepSpeed handles gradient clipping internally")
# DeepSpeed's ZeRO-3 gathers and scatters through torch names torch deprecated, once per call site
warnings.filterwarnings(
    "ignore", r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated"
)


def _not_an_advert(record: logging.LogRecord) -> bool:
    # Lightning's "💡 Tip: ... try installing litlogger" on every run: a product suggestion, not news
    return not str(record.msg).startswith("💡 Tip:")


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_not_an_advert)
quiet_torchvision_advice()  # validation samples with a diffusers pipeline


class PopAlignParser(LightningArgumentParser):
    """Parse errors as a few lines naming the key, without the 50-line usage text before them."""

    def error(self, message: str, ex: Exception | None = None):  # noqa: ANN201 - never returns
        if not self.exit_on_error:
            return super().error(message, ex)
        prog = getattr(ex, "subcommand_parser", None) or self
        prog = prog.prog.replace(" [options]", "")
        required = re.search(r"arguments are required: (\w+)\.", message)
        if required and " " not in prog:  # "fit.model" missing: the subcommand's help is the one to read
            prog = f"{prog} {required[1]}"
            message += " (a --config gives them, e.g. --config configs/tiny.yaml)"
        sys.stderr.write(
            f"{prog}: error: {brief_parse_error(message)}\n(`{prog} --help` lists every option)\n"
        )
        self.exit(2)


def brief_parse_error(message: str) -> str:
    """jsonargparse's message for a bad key inside a class (``model.init_args...``) or a class_path that
    does not import is a page listing every union subtype tried; the lines that say which option was
    refused, or why a class_path failed, are what a user needs."""
    lines = [line.strip() for line in message.splitlines()]
    refused = [line for line in lines if "is not accepted" in line]
    refused += [
        _class_path_problem(m[1], why) for m, why in zip(map(_CLASS_PATH.fullmatch, lines), lines[1:]) if m
    ]
    refused += [_class_path_problem(m[2], m[1]) for m in map(_CALLABLE_PATH.search, lines) if m]
    refused = [r for r in refused if r]
    if not refused:
        return message.strip()
    key = lines[0].rstrip(":")
    return f"{key}: {'; '.join(dict.fromkeys(refused))}"


_CLASS_PATH = re.compile(r"- Problem with given class_path '(.+)':")
# an optimizer or scheduler (a callable type): the reason and the class_path share one line
_CALLABLE_PATH = re.compile(
    r"expects a function or a callable class: (.+)\. Got value: Namespace\(class_path='([^']+)'"
)
_NO_ATTRIBUTE = re.compile(r"module '(.+)' has no attribute '(.+)'")


def _class_path_problem(class_path: str, why: str) -> str | None:
    # a class that imported but whose own arguments failed says "Parser key ..." next: not the culprit
    if why.startswith("Parser key"):
        return None
    hint = _NO_ATTRIBUTE.fullmatch(why)
    if hint and hint[1] in sys.modules:
        close = difflib.get_close_matches(hint[2], dir(sys.modules[hint[1]]), n=1)
        why += f" (did you mean {hint[1]}.{close[0]}?)" if close else ""
    return f"class_path '{class_path}': {why}"


class PopAlignCLI(LightningCLI):
    """LightningCLI with popalign's defaults: TensorBoard logs and a `last.ckpt` for resuming.

    Differences from a plain LightningCLI, each for a reason:

    - the config given wins on resume: LightningCLI would parse the checkpoint's saved model
      arguments over it, silently dropping a moved ``pretrained_model`` or a new ``ema_decay``;
      :meth:`PopAlignModule.on_load_checkpoint` refuses the changes a run cannot survive (another
      base model, full vs LoRA) and logs the others;
    - one optimizer knob (``model.init_args.optimizer``): no top-level ``--optimizer`` that would
      replace it unannounced;
    - checkpoints (:func:`popalign.checkpointing.prepare_checkpointing`): a ``ModelCheckpoint`` without
      ``dirpath`` writes to ``<save_dir>/<name>/checkpoints`` of the logger, not into the run's
      ``version_N`` folder, so ``--ckpt_path last`` finds it next time; ``last.ckpt`` is the final
      step; files are written whole (never a truncated checkpoint);
    - ``--ckpt_path`` is checked before anything starts (one line for a missing or broken file), and
      a full checkpoint file is not handed to Lightning's plain ``fsdp`` (see :meth:`before_fit`).
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("parser_class", PopAlignParser)
        super().__init__(*args, **kwargs)

    def _parse_ckpt_path(self) -> None:
        # LightningCLI parses the checkpoint's model arguments over the config here; popalign only
        # checks the file, so the config given is the one that runs
        if self.config.get("subcommand"):
            check_ckpt_path(self.config[self.config.subcommand].get("ckpt_path"))

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # the module has no test_step and no forward for predict: those subcommands could only fail
        return {k: v for k, v in LightningCLI.subcommands().items() if k in ("fit", "validate")}

    def before_validate(self) -> None:
        """``validate`` runs the validation shards: one line when there are none (Lightning's error
        is a traceback about a ``None`` dataloader)."""
        if isinstance(self.datamodule, PopulationDataModule):
            if not self.datamodule.val_shards:
                raise UserError(
                    "validate needs validation shards: pass --data.val_shards (popalign build's --out)"
                )
            expand_shards(self.datamodule.val_shards)

    def before_fit(self) -> None:
        """Check the shard paths (before the logger writes a run folder), refuse a fresh run into a
        checkpoint folder holding an earlier run's checkpoints, a resume the run cannot continue
        (another base model, other LoRA settings: :func:`popalign.resume.check_before_fit`, also before
        the run folder), and resuming a checkpoint *file* under Lightning's plain ``fsdp``. Under
        DeepSpeed, set its ``train_micro_batch_size_per_gpu`` to the DataModule's batch unless given.

        The checkpoint folder is fixed (``--ckpt_path last`` must find it after a restart), so a second
        fresh run there would write ``last-v1.ckpt`` beside the first run's ``last.ckpt``, and exporting
        ``last.ckpt`` would silently take the old run. Plain ``fsdp`` loads a checkpoint file strictly,
        and popalign's checkpoints leave out the frozen weights (a page of "Missing key(s)");
        ``fsdp_blocks`` resumes them; sharded checkpoint folders resume under either."""
        from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

        ckpt_path = self.config[self.config.subcommand].get("ckpt_path")
        if isinstance(self.datamodule, PopulationDataModule):  # before the logger makes a run folder
            for shards in (self.datamodule.train_shards, self.datamodule.val_shards):
                if shards:
                    expand_shards(shards)
        folders = [c.dirpath for c in self.trainer.checkpoint_callbacks if getattr(c, "dirpath", None)]
        if not ckpt_path:
            refuse_earlier_checkpoints(self.trainer.checkpoint_callbacks)
        elif str(ckpt_path) == "last" and last_checkpoint(folders) is None:
            # a requeued job passes --ckpt_path last from its first run on; Lightning's warning for
            # this case advises save_last=True, which the config already has
            where = ", ".join(folders) or "trainer.callbacks (no ModelCheckpoint)"
            rank_zero_info(f"--ckpt_path last: no last checkpoint in {where} yet; training from step 0")
        model, strategy = self.model, self.trainer.strategy
        if isinstance(model, PopAlignModule):  # what the run would refuse later, before its run folder
            model.check_optimizer_config(strategy)  # an lr torch refuses, an optimizer DeepSpeed does
            if ckpt_path:  # another base, other LoRA settings
                check_before_fit(
                    str(ckpt_path), folders, dict(model.hparams), model.base_fingerprint, model.lora
                )
        if isinstance(strategy, DeepSpeedStrategy) and isinstance(self.datamodule, PopulationDataModule):
            # Lightning reads it off the loader's batch sampler, and popalign's loader yields whole
            # batches (it has none: an AttributeError at set-up); DeepSpeed uses it for its logs
            strategy.config.setdefault("train_micro_batch_size_per_gpu", self.datamodule.batch_rows)
        if not ckpt_path or not isinstance(strategy, FSDPStrategy) or isinstance(strategy, BlockFSDPStrategy):
            return
        if Path(ckpt_path).is_dir() or (
            str(ckpt_path) in CKPT_NAMES and strategy._state_dict_type == "sharded"
        ):
            return
        raise UserError(
            f"--ckpt_path {ckpt_path}: Lightning's plain fsdp cannot resume a full checkpoint file (it "
            "loads it strictly, and popalign's checkpoints leave out the frozen weights); resume with "
            "--trainer.strategy fsdp_blocks"
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults(
            {
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                    "init_args": {"save_dir": "runs", "name": "popalign"},
                },
                "trainer.callbacks": [
                    {
                        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                        "init_args": {"save_last": True, "every_n_train_steps": 100},
                    },
                    {
                        "class_path": "lightning.pytorch.callbacks.LearningRateMonitor",
                        "init_args": {"logging_interval": "step"},
                    },
                ],
            }
        )

    def instantiate_trainer(self, **kwargs):  # noqa: ANN003, ANN201 - LightningCLI's signature
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError) as err:  # max_steps -5, strategy bogus: one line
            raise UserError(f"trainer: {' '.join(str(err).split())}") from None
        prepare_checkpointing(trainer)
        add_agreed_sigterm_stop(trainer)
        tidy_progress_bars(trainer.callbacks)
        _TRAINERS.add(trainer)
        return trainer


def cli_main(args: list[str] | None = None, run: bool = True) -> PopAlignCLI:
    """Build the CLI (and run the subcommand); a :class:`UserError` exits 2 with its one-line message,
    also when jsonargparse wrapped it (errors raised while it instantiates the model or data); Ctrl-C
    exits 130 with one line, as the ``popalign`` stages do (Lightning's graceful shutdown exits 1), and
    SIGTERM (a scheduler's preemption) exits 143 with one line (Lightning's stop would exit 0, as if the
    run had finished; see :func:`sigterm_stop`)."""
    resume = "resume from the last checkpoint with --ckpt_path last"
    try:
        check_config_files(sys.argv[1:] if args is None else args)
        return _build(args, run)
    except BaseException as stop:  # noqa: BLE001 - re-raised unless it is one of the stops below
        if sigterm_stop(stop):
            saved = _saved_at_stop()
            if saved:
                resume = f"saved {saved[0]} at step {saved[1]}; resume with --ckpt_path last"
            elif (failure := _failure_behind(stop)) is not None:  # why the step in progress is lost
                resume = (
                    f"the step in progress failed ({type(failure).__name__}: {first_line(failure)}); {resume}"
                )
            if all(trainer.global_rank == 0 for trainer in _TRAINERS):  # one line, not one per rank
                print(f"train.py: stopped by SIGTERM; {resume}", file=sys.stderr)
            raise SystemExit(128 + signal.SIGTERM) from None
        if isinstance(stop, KeyboardInterrupt) or (
            isinstance(stop, SystemExit) and lightning_interrupt(stop)
        ):
            print(f"train.py: interrupted; {resume}", file=sys.stderr)
            raise SystemExit(130) from None
        user_error = None if isinstance(stop, SystemExit) else _user_error_in(stop)  # --help, argparse
        if user_error is None:
            raise
        print(f"train.py: error: {user_error}", file=sys.stderr)
        raise SystemExit(2) from None


def check_config_files(args: list[str]) -> None:
    """Each ``--config FILE`` must be UTF-8 YAML: otherwise one line naming the file (jsonargparse shows
    a YAML error without the file's name, and a binary file as a traceback). Values that are not files
    (a missing path, YAML given inline) are left to jsonargparse."""
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            path = Path(args[i + 1])
        elif arg.startswith("--config="):
            path = Path(arg.split("=", 1)[1])
        else:
            continue
        if not path.is_file():
            continue
        try:
            with open(path, encoding="utf-8") as f:
                yaml.safe_load(f)  # the error marks name the file: in "configs/x.yaml", line 3
        except UnicodeDecodeError:
            raise UserError(f"{path}: not a text file (not UTF-8); --config takes a YAML file") from None
        except yaml.YAMLError as err:
            raise UserError(f"{path}: invalid YAML ({' '.join(str(err).split())})") from None


#: the trainers the current run built (weakly held), so a stop can tell whether SIGTERM reached one
_TRAINERS: weakref.WeakSet = weakref.WeakSet()


def sigterm_stop(stop: BaseException) -> bool:
    """Whether ``stop`` ends a run that SIGTERM stopped.

    Lightning's handler sets a flag and its loop raises ``SIGTERMException`` (a ``SystemExit`` without
    a code) after the current step. A scheduler signals the whole process group, though: a DataLoader
    worker may die of the same SIGTERM (popalign's outlive it once they run), and the DataLoader
    reports that as a ``RuntimeError`` wherever the main process is, before the loop's check or while
    it tears down. So: a ``SIGTERMException`` in the
    chain of exceptions, or any exception once a trainer of this process has received SIGTERM."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    if any(isinstance(err, SIGTERMException) for err in _chain(stop, "__context__")):
        return True
    return received_sigterm()


def received_sigterm() -> bool:
    """Whether a trainer of the current run has received SIGTERM (:func:`popalign.preemption.sigterm_noted`)."""
    return any(sigterm_noted(trainer) for trainer in _TRAINERS)


def _saved_at_stop() -> tuple[str, int] | None:
    """(path, step) of the checkpoint a :class:`FinalStepCheckpoint` wrote when SIGTERM stopped the run."""
    for trainer in _TRAINERS:
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, FinalStepCheckpoint) and callback.saved_at_stop:
                return callback.saved_at_stop
    return None


def _user_error_in(err: BaseException | None) -> UserError | None:
    # explicit causes only ("raise ... from err", as jsonargparse wraps): an error raised while
    # another was being handled is a new failure and keeps its traceback
    return next((e for e in _chain(err, "__cause__") if isinstance(e, UserError)), None)


def _failure_behind(stop: BaseException) -> BaseException | None:
    """The error that ended a run SIGTERM stopped, if one did (a data worker's death, a failing step),
    rather than Lightning's own stop after the step."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    return next(
        (e for e in _chain(stop, "__context__") if not isinstance(e, (SIGTERMException, SystemExit))), None
    )


def _chain(err: BaseException | None, link: str) -> Iterator[BaseException]:
    """``err`` and the exceptions behind it through ``link`` (``__cause__`` or ``__context__``), once each."""
    seen = set()
    while err is not None and id(err) not in seen:
        yield err
        seen.add(id(err))
        err = getattr(err, link)


def _build(args: list[str] | None, run: bool) -> PopAlignCLI:
    register_strategy()  # --trainer.strategy fsdp_blocks
    _TRAINERS.clear()  # an earlier run's SIGTERM (the demo's, a test's) says nothing about this one
    with warnings.catch_warnings():
        # Lightning warns when args= is given while sys.argv holds a command line: exactly the demo's
        # case (`popalign demo ...` runs the training in-process with its own arguments)
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        return PopAlignCLI(
            PopAlignModule,
            PopulationDataModule,
            subclass_mode_model=True,
            parser_kwargs={"parser_mode": "omegaconf"},
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )
