"""Build the KuaiRand-Pure sample shipped in src/hashrec/datasets/kuairand_sample/.

    python scripts/make_kuairand_sample.py [--source ../shared/data/kuairand-pure] [--users 8000]

Keeps every impression of a seeded random subset of users, in the official column layout
(gzipped), the video table rows of the videos they saw and the user table rows of those users
(the side features ``load_kuairand`` reads). KuaiRand (Gao et al., CIKM 2022) is
CC BY-SA 4.0: the LICENSE and attribution travel with the sample.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.csv as pacsv

DEST = Path(__file__).resolve().parents[1] / "src/hashrec/datasets/kuairand_sample"

README = """# KuaiRand-Pure sample

A sample of KuaiRand-Pure: every standard-feed impression of {users:,} randomly chosen users
(seed {seed}) over 2022-04-25 .. 2022-05-05 ({rows:,} rows), the video-table rows of the
{videos:,} videos they saw and the user-table rows of those users, in the official column
layout. Built by `scripts/make_kuairand_sample.py`.

Source: KuaiRand, Gao et al., "KuaiRand: An Unbiased Sequential Recommendation Dataset with
Randomly Exposed Videos", CIKM 2022 (doi 10.1145/3511808.3557624). License: CC BY-SA 4.0
(LICENSE in this folder). These rows are derived from that dataset and are shared under the same
license, with this attribution.
"""


def write_gz(table, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    pacsv.write_csv(table, tmp)
    with open(tmp, "rb") as src, open(path, "wb") as raw:  # mtime=0: byte-stable output
        with gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as dst:
            shutil.copyfileobj(src, dst)
    tmp.unlink()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default="../shared/data/kuairand-pure")
    p.add_argument("--users", type=int, default=8000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    src = Path(args.source)
    log = pacsv.read_csv(src / "log_standard_4_25_to_5_05_pure.csv")
    users = np.unique(log.column("user_id").to_numpy())
    keep = np.random.default_rng(args.seed).choice(users, size=args.users, replace=False)
    log = log.filter(pc.is_in(log.column("user_id"), value_set=pc.unique(keep)))
    videos = pacsv.read_csv(src / "video_features_basic_pure.csv")
    videos = videos.filter(
        pc.is_in(videos.column("video_id"), value_set=pc.unique(log.column("video_id")))
    )
    users_table = pacsv.read_csv(src / "user_features_pure.csv")
    users_table = users_table.filter(
        pc.is_in(users_table.column("user_id"), value_set=pc.unique(log.column("user_id")))
    )
    DEST.mkdir(parents=True, exist_ok=True)
    write_gz(log, DEST / "log_standard_4_25_to_5_05_sample.csv.gz")
    write_gz(videos, DEST / "video_features_basic_sample.csv.gz")
    write_gz(users_table, DEST / "user_features_sample.csv.gz")
    shutil.copy(src / "LICENSE", DEST / "LICENSE")
    (DEST / "README.md").write_text(
        README.format(users=args.users, seed=args.seed, rows=log.num_rows, videos=videos.num_rows)
    )
    print(f"wrote {DEST}: {log.num_rows:,} impressions, {videos.num_rows:,} videos")


if __name__ == "__main__":
    main()
