"""`make test`'s worker groups (tests/conftest.py): a module that starts a SLURM test cluster (fixed ports) or reads
the session's reduced study must share a worker with every other such module, or two clusters would start at once
and the study would be built twice."""

import re

import conftest
from helpers import REPO

SHARES = re.compile(r"\bCluster\(|\breduced_inputs\b|\blocal_study\b")


def test_every_module_that_starts_a_cluster_or_reads_the_reduced_study_is_in_the_one_worker_group():
    modules = {path.name for path in (REPO / "tests").glob("test_*.py") if SHARES.search(path.read_text())}
    assert modules == set(conftest.ONE_WORKER)
    assert {conftest.worker_group(m) for m in modules} == {"slurm-and-reduced-study"}
    assert conftest.worker_group("test_config.py") == "test_config.py"  # any other module is a group of its own


def test_the_longest_groups_come_first_and_every_group_keeps_its_file_order():
    class Item:
        def __init__(self, name):
            self.path = REPO / "tests" / name

    names = ["test_a.py", "test_slurm.py", "test_b.py", "test_demo_e2e.py", "test_dvc_remote.py", "test_a.py"]
    items = [Item(n) for n in names]
    conftest.pytest_collection_modifyitems(None, items)
    assert [i.path.name for i in items] == ["test_demo_e2e.py", "test_slurm.py", "test_dvc_remote.py", "test_a.py",
                                            "test_b.py", "test_a.py"]
