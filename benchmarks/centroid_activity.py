"""How often each centroid-loss form is active on real stage-2 features (docs/method.md).

At the start of OLTR's stage 2 the memory holds the class means of the stage-1 model's direct
features over the train split (DESIGN of the method, paper §3.1). This script takes a trained
stage 1, computes those features and centroids exactly as stage 2 starts, and prints, per form
and margin, the share of train images whose hinge is open (loss > 0) — a form that is never
active contributes no gradient, whatever its formula.

    python benchmarks/centroid_activity.py RUN/stage1 --data data/fmnist-lt
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from oltr.config import load_saved_config
from oltr.data import dataset_for, load_benchmark
from oltr.inference import collect_outputs, eval_loader, load_model
from oltr.losses import LargeMarginCentroidLoss, NearestCentroidLoss
from oltr.models import class_means


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage_dir", type=Path, help="a trained stage 1 (model.safetensors)")
    parser.add_argument("--data", required=True, type=Path)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    net, _ = load_model(args.stage_dir)
    cfg = load_saved_config(args.stage_dir / "config.yaml")
    bench = load_benchmark(args.data)
    outputs = collect_outputs(net, eval_loader(dataset_for(bench, "train", cfg["data"],
                                                           train=False), 512, 0),
                              torch.device("cpu"))
    features = torch.from_numpy(outputs["features"]).float()
    labels = torch.from_numpy(outputs["labels"]).long()
    centroids = class_means(features, labels, bench.num_classes)
    norms = features.norm(dim=1)
    distances = torch.cdist(features, centroids)
    own = distances.gather(1, labels[:, None]).squeeze(1)
    nearest = distances.scatter(1, labels[:, None], float("inf")).min(dim=1).values
    print(f"{len(labels)} train images, d = {features.shape[1]}, K = {bench.num_classes}; "
          f"‖v‖ median {norms.median():.2f}; own-centroid distance median {own.median():.2f}; "
          f"nearest other centroid median {nearest.median():.2f}")
    rows = [("printed (Eq. 9 as printed)", LargeMarginCentroidLoss, False, (5.0,)),
            ("nearest, absolute margin", NearestCentroidLoss, False, (1.0, 2.0, 5.0)),
            ("nearest, relative margin m·‖v‖", NearestCentroidLoss, True, (0.1, 0.25, 0.5))]
    for name, form, relative, margins in rows:
        for margin in margins:
            hinge = form(margin=margin, relative=relative).hinge(features, labels, centroids)
            print(f"{name:32s} m = {margin:<5g} active {100 * (hinge > 0).float().mean():5.1f} %"
                  f"   largest hinge argument {hinge.max():8.2f}")


if __name__ == "__main__":
    main()
