"""`grains-edge export`: write a steered ONNX graph, its tokenizer and manifest, verified."""

from __future__ import annotations

import argparse

from grains_edge.options import KERNEL_CHOICES, QUANTIZATIONS


def register(subparsers) -> None:
    parser = subparsers.add_parser("export", help="export a model to a steered ONNX graph")
    parser.add_argument("--model", default="default", help="'default', a local HF folder, a .gguf, or a Hub id")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--layers", default="all", help="steered layers: all | A-B | i,j,k | none (default all)")
    parser.add_argument(
        "--quantize", default="none", choices=QUANTIZATIONS, help="weight-only quantization of the MatMuls"
    )
    parser.add_argument(
        "--kernels",
        default="auto",
        choices=KERNEL_CHOICES,
        help="a GGUF's Q4_1 linears in grains-edge's own kernel (auto: when it builds here) or stock ONNX Runtime's",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from grains_edge.export.onnx_export import export

    export(args.model, args.out, layers_spec=args.layers, quantize=args.quantize, kernels=args.kernels)
    return 0
