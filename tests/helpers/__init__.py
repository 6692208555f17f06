"""What the tests share; no test module imports another.

- ``common``: the system built for, the in-memory tests' runner config, a builder config, a
  build spec, ``wait_until`` (polling in virtual time).
- ``sim``: an in-process network of pausable, blackholable links, and ``Farmlet``, the one
  in-memory runner (farm, dispatcher, storage, a session per connection) that real builders
  join over the network and ``FakeBuilder``s connect to directly.
- ``fake_builder``: ``FakeBuilder``, a builder's end of one connection driven by a test.
- ``fake_runner``: ``FakeRunner``, a runner's end of a builder's connections, scripted.
- ``runner``: ``Runner``, a real queue runner on loopback with an HTTP client (the ``runner``
  fixture of conftest.py).
- ``executor``: the command executor run directly.
- ``cli``: the command line in-process, in a clean environment.
- ``procs``: real daemons as child processes; ``pg``: a throwaway PostgreSQL cluster.
- ``strategies``: hypothesis strategies for every protocol message.
- ``slow_threads``: ``pytest --slow-threads MIN-MAX`` delays every worker-thread job, to find
  virtual deadlines a loaded machine's threads can run out under the autojump clock.
- ``simfarm``, ``simjournal``, ``simprocess``: the whole-farm simulation of
  test_simulation.py.
"""
