"""Stand-ins the tests and the demo share: tiny random Llama checkpoints and tokenizers built locally
(no hub), and a client for a local single-node Slurm. Not used by the training or conversion code."""
