"""Data-quality filtering of image-text datasets (tools/filter_dataset.py): CLIP similarity of
every image-text pair, exact and near-duplicate images, near-duplicate captions. The input is
never changed; the output is the filtered dataset in the same format, every dropped record with
its reason and score, counts by reason, and the similarity histogram.

* ``dataset.py``  records of any format (captions, conversations, interleaved, shards) in, the
                  kept ones out in the same format
* ``signals.py``  what is measured per record: content hashes, colour perceptual hashes, colour
                  thumbnails, CLIP embeddings and similarity (the resumable, sharded part)
* ``dedup.py``    exact duplicates, near-duplicate images and near-duplicate captions, greedy in
                  input order (the first of a group is kept)
* ``report.py``   the similarity histogram (PNG and text) and the summary
* ``pipeline.py`` the run: shard the records over ranks, measure in batches saved as they finish
                  (a killed run continues), decide on rank 0, write everything atomically
"""
