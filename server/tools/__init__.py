"""Developer tools: the benchmark, the soak test and the README sections generated from the code."""
