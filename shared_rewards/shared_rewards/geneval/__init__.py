"""GenEval: the benchmark's scoring rules, the reward server's training scores, detectors, server and client."""
