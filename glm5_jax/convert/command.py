"""`glm5 convert hf-to-orbax` and `glm5 convert orbax-to-hf`: their options; the work is `glm5_jax.convert.hf`."""

from __future__ import annotations

from glm5_jax.values import key_values


def run_hf_to_orbax(args):
    from glm5_jax.convert.hf import hf_to_orbax

    cfg = hf_to_orbax(args.hf_dir, args.out, overrides=args.override, overwrite=args.overwrite,
                      show_progress=not args.quiet)
    print(f"wrote {args.out} (step 0): {cfg.num_hidden_layers} layers, "
          f"{'with' if cfg.has_mtp else 'without'} MTP, params {cfg.param_dtype}")


def run_orbax_to_hf(args):
    from glm5_jax.convert.hf import orbax_to_hf

    orbax_to_hf(args.checkpoint, args.out, step=args.step, dtype=args.dtype, max_shard_size=args.max_shard_size,
                overwrite=args.overwrite, show_progress=not args.quiet, quantize=args.quantize)
    print(f"wrote {args.out}")


def register(sub):
    convert = sub.add_parser("convert", help="convert between HF safetensors and Orbax checkpoints")
    csub = convert.add_subparsers(dest="direction", required=True)
    h2o = csub.add_parser("hf-to-orbax", help="transformers GLM-5 directory -> Orbax checkpoint (step 0)")
    h2o.add_argument("--hf-dir", required=True, help="directory with config.json and *.safetensors")
    h2o.add_argument("--out", required=True, help="checkpoint directory to create")
    key_values(h2o, "--override", "set a config field config.json lacks, e.g. param_dtype=bfloat16 (repeatable)")
    h2o.set_defaults(run=run_hf_to_orbax)
    o2h = csub.add_parser("orbax-to-hf", help="Orbax checkpoint -> transformers GLM-5 directory")
    o2h.add_argument("--checkpoint", required=True, help="checkpoint directory (Orbax CheckpointManager root)")
    o2h.add_argument("--step", type=int, default=None, help="step to export (default: latest committed)")
    o2h.add_argument("--out", required=True, help="directory to create")
    o2h.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                     help="tensor dtype in the safetensors files (router bias stays float32)")
    o2h.add_argument("--max-shard-size", default="5GB", help="largest safetensors file, e.g. 5GB, 500MB")
    o2h.add_argument("--quantize", choices=("int4",), default=None,
                     help="int4: routed experts in compressed-tensors pack-quantized (a QAT checkpoint's weights, "
                          "bit for bit); the rest in --dtype")
    o2h.set_defaults(run=run_orbax_to_hf)
    for c in (h2o, o2h):
        c.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
        c.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
