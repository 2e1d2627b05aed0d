"""Stand-ins the tests and the demo share: tiny random Llama checkpoints and tokenizers built locally
(no hub), a client for a local single-node Slurm, and the demo's corpora (synthetic e-commerce and
general text, real prose and code that ship with Debian and Python; the benchmarks read them too).
Not used by the training or conversion code."""
