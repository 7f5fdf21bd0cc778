"""S3 that fails a fraction of requests (HTTP 500, 503, connection resets), through a small
fault-injecting proxy on 127.0.0.1 in front of moto's server: the job must retry its way
through and account for every row exactly once."""

from __future__ import annotations

import itertools

import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline.batch.run import run
from pipeline.output.verify import verify

from s3_proxy import S3Proxy

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


def every_kth_request_fails(every: int):
    """A rule failing request k (counting from 1) when k % every == 0, cycling through
    500, 503 and a dropped connection."""
    counter, modes = itertools.count(1), itertools.cycle(["500", "503", "reset"])
    return lambda method, path: None if next(counter) % every else next(modes)


@pytest.fixture
def faulty_s3(s3_server, s3):
    fs, bucket, options = s3
    with S3Proxy(s3_server, every_kth_request_fails(3)) as proxy:  # a third of all requests fail
        yield proxy, fs, bucket, options, {**options, "endpoint_url": proxy.url}


def test_job_through_failing_s3(ray_cluster, make_spec, prompts, faulty_s3, tmp_path):
    proxy, direct, bucket, direct_options, flaky = faulty_s3
    lines = (prompts / "partiprompts" / "PartiPrompts.tsv").read_text().splitlines()[1:25]
    table = tmp_path / "p.parquet"
    pd.DataFrame({"prompt": [line.split("\t")[0] for line in lines]}).to_parquet(table)
    direct.put(str(table), f"{bucket}/in/p.parquet")

    spec = make_spec(
        {"url": f"s3://{bucket}/in/p.parquet", "storage_options": flaky},
        output={"url": f"s3://{bucket}/out", "storage_options": flaky, "rows_per_part": 4},
    )
    summary = run(spec)

    assert (summary.images, summary.errors) == (24, 0)
    assert all(n >= 1 for n in proxy.injected.values()), proxy.injected  # each kind of fault was met
    # Read back directly from moto: what landed is exactly the dataset, once.
    images = pq.read_table(f"{bucket}/out/images", filesystem=direct).to_pandas()
    assert len(images) == 24 and images["request_id"].is_unique
    report = verify(f"s3://{bucket}/out", direct_options, spec)
    assert report.ok, report.format()
