"""Developer tools: the benchmark, the soak test and the README and docs/ sections generated from the code."""
