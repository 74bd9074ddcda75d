"""Unit-testing code that uses bigexec, on the ``threads`` system.

``threads`` machines live in the test process but everything still goes through pickling and
the real RPC path, so a test here catches what would break on a real cluster (an unpicklable
service, a method that does not exist), and ``b.system.kill(m)`` shows how the code copes
with a crash. Run it with ``python -m unittest examples/test_with_threads.py``.
"""

from __future__ import annotations

import unittest

import bigexec


class WordCount:
    """The service under test: counts words in the texts it is given."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def add(self, text: str) -> int:
        for word in text.split():
            self.counts[word] = self.counts.get(word, 0) + 1
        return len(self.counts)

    def top(self, k: int) -> list[tuple[str, int]]:
        return sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]


class WordCountTest(unittest.TestCase):
    def setUp(self) -> None:
        self.b = bigexec.start("threads", keepalive_period=0.1, keepalive_timeout=1.0,
                               keepalive_rpc_timeout=0.5)
        self.addCleanup(self.b.shutdown)
        (self.m,) = self.b.start(1, services={"Words": WordCount()})
        self.assertTrue(self.m.wait(bigexec.RUNNING, timeout=10))
        self.assertIsNone(self.m.err)

    def test_counts_words_on_the_machine(self) -> None:
        self.m.call("Words.add", "a b a")
        self.m.call("Words.add", "b a c")
        self.assertEqual(self.m.call("Words.top", 2), [("a", 3), ("b", 2)])

    def test_each_machine_has_its_own_state(self) -> None:
        (other,) = self.b.start(1, services={"Words": WordCount()})
        other.wait(bigexec.RUNNING, timeout=10)
        self.m.call("Words.add", "x")
        self.assertEqual(other.call("Words.top", 1), [])

    def test_a_crash_fails_calls_clearly(self) -> None:
        self.b.system.kill(self.m)
        with self.assertRaises(bigexec.MachineStopped):
            self.m.call("Words.top", 1)

    def test_the_executor_runs_on_threads_too(self) -> None:
        with bigexec.Executor(2, system="threads") as ex:
            self.assertEqual(list(ex.map(len, ["a", "bb", "ccc"])), [1, 2, 3])


if __name__ == "__main__":
    unittest.main()
