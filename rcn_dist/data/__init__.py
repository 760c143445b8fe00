"""Data: source readers (IDX, CIFAR-10 batches, MultiMNIST synthesis), WebDataset shards with a
manifest, and the streaming loader split by data-parallel rank."""
