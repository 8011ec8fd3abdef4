"""Developer tools: the benchmark and the sample clip. They may import torch, the exporter and the reference;
the runtime imports none of them."""
