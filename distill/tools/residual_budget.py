"""``distill residual-budget``: ResidualKD's S and A derived from one given network, and their params and FLOPs.

    distill residual-budget resnet8x4 --teacher-model resnet32x4 --num-classes 100 --image-size 32

The derivation itself is :mod:`distill.models.budget`.
"""

from __future__ import annotations

import argparse
import json

from distill.models.budget import PairCost, build_network, build_pair, derive_pair, pair_cost
from distill.models.residual import feature_shape


def main(argv: list[str] | None = None) -> PairCost:
    parser = argparse.ArgumentParser(
        prog="distill residual-budget",
        description="Derive ResidualKD's student S and assistant A from MODEL (by width) and print params and "
                    "FLOPs of S, A, S+A and MODEL.")
    parser.add_argument("model", help="the given model's zoo name, e.g. resnet8x4, wrn_16_2, tv.resnet18")
    parser.add_argument("--teacher-model", default=None,
                        help="the teacher's zoo name, for its final feature shape (default: MODEL's own)")
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--in-channels", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--assistant-ratio", type=float, default=0.1, help="FLOPs of A / FLOPs of S (default 0.1)")
    parser.add_argument("--model-kwargs", type=json.loads, default={}, help='options of MODEL as JSON, e.g. \'{"width": 2}\'')
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    common = dict(num_classes=args.num_classes, in_channels=args.in_channels, image_size=args.image_size)
    teacher = build_network(args.teacher_model or args.model, {} if args.teacher_model else args.model_kwargs, **common)
    target = feature_shape(teacher, args.in_channels, args.image_size)
    kwargs = derive_pair(args.model, args.model_kwargs, target, assistant_ratio=args.assistant_ratio, **common)
    pair = build_pair(kwargs, **common)
    cost = pair_cost(pair, build_network(args.model, args.model_kwargs, **common), args.in_channels, args.image_size)
    if args.json:
        print(json.dumps({"pair": kwargs, "cost": cost.rows, "within_budget": cost.within_budget()}, indent=2))
    else:
        print(f"S = {args.model} × {kwargs['student_kwargs']['width']}, A = {args.model} × "
              f"{kwargs['assistant_kwargs']['width']}, teacher feature {list(target)}, image {args.image_size} px\n")
        print(cost.table())
        print(f"\nS+A within the budget of {args.model}: {'yes' if cost.within_budget() else 'NO'}")
    return cost



if __name__ == "__main__":
    main()
