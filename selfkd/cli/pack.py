"""``selfkd pack SRC --out DIR``: decode an image folder or tar archive into memory-mappable shards."""
from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("pack", parents=parents,
                       help="decode an image folder (or a tar/.tar.gz of one) into memory-mapped shards "
                            "(train with --data packed --data-dir DIR)")
    p.add_argument("src", metavar="SRC", help="a folder with train/<class>/ and val/ or test/, or a tar archive of it")
    p.add_argument("--out", required=True, metavar="DIR", help="a new or empty folder")
    p.add_argument("--image-size", type=int, metavar="PX", help="resize every image to PX x PX (as data.image_size)")
    p.add_argument("--shard-images", type=int, metavar="N", help="images per shard (default: about 512 MiB per shard)")
    p.set_defaults(func=cmd_pack)


def cmd_pack(a: argparse.Namespace) -> int:
    from ..data.packed import pack

    m = pack(a.src, a.out, image_size=a.image_size, shard_images=a.shard_images,
             log=lambda msg: print(msg, file=sys.stderr))
    c, h, w = m["image_shape"]
    sp = m["splits"]
    print(f"{a.out}: {sp['train']['count']} train / {sp['test']['count']} test images ({m['eval_split']}/), "
          f"{len(m['classes'])} classes, {c}x{h}x{w}, {len(sp['train']['shards']) + len(sp['test']['shards'])} shards")
    return 0
