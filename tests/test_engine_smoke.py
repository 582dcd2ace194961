from collections import Counter

from engine.queue import Queue
from support.handlers import read_records
from support.postgres import scalar

CONFIG = """
[global]
heartbeat_interval = "1s"
stale_after = "3s"
rescue_interval = "1s"
[flows.rec]
handler = "support.handlers:record"
batch_size = 200
"""


def test_drain_20k_with_4_workers(dsn, start_engine, tmp_path):
    record = tmp_path / "record.txt"
    with Queue(dsn) as q:
        q.enqueue_many("rec", [{"n": i} for i in range(20000)])
    engine = start_engine(dsn, CONFIG, "--workers", "4", "--drain", env={"SKIPLOCK_TEST_RECORD": str(record)})
    assert engine.wait(60) == 0, engine.log_path.read_text()[-3000:]
    runs = Counter(n for n, _ in read_records(str(record)))
    assert len(runs) == 20000 and set(runs.values()) == {1}
    assert scalar(dsn, "SELECT count(*) FROM skiplock.jobs_done") == 20000
    assert len({pid for _, pid in read_records(str(record))}) == 4
