"""Everything fine_tune checks and settles before the first step: the model and its loss,
the data against both, the optimizer, the plan, the checkpoint to resume, then the trainer."""
from __future__ import annotations

import os

from .. import api, devices, optim, parallel as tlparallel, registry
from ..errors import DataError
from ..kinds import Composite
from . import checkpoint, options, plan as tlplan
from .feed import as_dataset, check_data
from .snapshot import Snapshot
from .state import Run


def model_to_train(model):
    """The TransferModel fine_tune trains (a gated fusion: its gate)."""
    if isinstance(model, Composite):
        model = model._trained_model()
    m = api._check_model(model)
    api._need_head(m, "fine_tune")
    return m


def _check_ema(opt, stop) -> None:
    if opt.ema is not None and opt.ema.swap and stop is not None and stop.restore_best:
        raise DataError("Expected one source for the final weights; received ema with "
                        "swap=True and early_stopping with restore_best=True. Pass "
                        "ema=tl.optim.EMA(d, swap=False) (keep the best epoch; the EMA stays in "
                        "history.ema_weights), or EarlyStopping(restore_best=False).")


def _monitor_names(run: Run) -> list[str]:
    """The history keys a run will have, for the early-stopping monitor."""
    m, loss = run.m, run.loss
    available = ["loss"] + (["penalty"] if run.opt.regularizer is not None else [])
    available += loss.history_names()
    names = loss.score_names(m.num_outputs)
    if run.vds is not None:
        available += [f"val_{k}" for k in names]
        if run.opt.ema is not None:
            available += [f"val_{k}_ema" for k in names]
    return available


def _data(m, loss, train, val, batch_size, seed):
    ds = check_data(m, as_dataset(train, batch_size, True, seed, m.dtype, "train", m, loss),
                    "train", loss)
    vds = None if val is None else check_data(
        m, as_dataset(val, batch_size, False, seed, m.dtype, "val", m, loss), "val", loss)
    return ds, vds


def prepare(m, train, *, val, epochs, batch_size, optimizer, unfreeze, loss, early_stopping,
            checkpoint: object, seed, progress, callbacks, feature_cache, precision,
            parallel) -> Run:
    """A Run whose every setting has been checked; nothing has changed yet."""
    be = registry.load(m.backend)
    spec = api.loss_spec(m, loss)
    precision = devices.check_precision(precision, m.dtype, m.device, m.backend)
    par = options.parallel(parallel)
    dp = tlplan.parallel_plan(m, par)
    compile = options.check_compile(m.state.get("compile", False), dp)     # tl.compile(m)
    ds, vds = _data(m, spec, train, val, batch_size, seed)
    opt = optim.resolve(optimizer)
    stop = options.early_stopping(early_stopping)
    _check_ema(opt, stop)
    run = Run(m, be, spec, opt, None, ds, vds, seed, stop, options.checkpoint(checkpoint), dp,
              precision, feature_cache, progress, list(callbacks or []), compile=compile)
    if stop is not None:
        options.check_monitor(stop, _monitor_names(run), vds is not None)
    tlplan.check_feature_cache_option(feature_cache)
    if dp is not None:
        tlparallel.check_batches(ds.batch_sizes(), dp.world, par.bn_sync)
    run.plan = tlplan.make(m, opt, unfreeze, epochs, len(ds))
    return run


def start(run: Run) -> None:
    """Read the checkpoint to resume (checked before anything changes), check the whole plan,
    then build the trainer and put the run where the checkpoint left it."""
    ck = run.checkpoint
    saved = None
    if ck is not None:
        run.identity = checkpoint.identity(run)
    if ck is not None and ck.resume and os.path.exists(ck.path):
        saved = checkpoint.read(run)
    run.start = 0 if saved is None else saved["epoch"] + 1
    tlplan.check(run.plan, run.m, run.loss, None if saved is None else saved["frozen"],
                 run.start, run.feature_cache, run.ds)
    m, opt = run.m, run.opt
    if opt.regularizer is not None:
        w = api.get_weights(m)
        run.anchors = {n: w[n] for n in run.plan.names if n.startswith("backbone.")}
    if run.parallel is not None:
        run.be.init_parallel(run.parallel, m)
    reg = None if opt.regularizer is None else (opt.regularizer.alpha, opt.regularizer.beta)
    run.trainer = run.be.make_trainer(m, opt.config(), run.plan.groups, reg, run.anchors,
                                      run.loss, precision=run.precision, parallel=run.parallel,
                                      compile=run.compile)
    if saved is not None:
        checkpoint.apply(run, saved)
    run.good = Snapshot.take(m, run.be)
    if opt.ema is not None:
        run.ema_w = saved["ema"] if saved is not None else api.get_weights(m)
        run.history.ema_weights = run.ema_w
    run.good_epoch = run.start - 1
    run.ckpt_epoch = run.start - 1 if saved is not None else None
