"""Built-in procedural worlds, generated from a seed with their ground truth (scene graphs):
Sort-of-CLEVR (Santoro et al. 2017) for VQA, and the shapes world for captioning, VQA and
retrieval. Every demo, test and benchmark runs on them offline."""
