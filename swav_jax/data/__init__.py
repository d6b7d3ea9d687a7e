"""Input pipeline: sources, host multi-crop (grain), device augmentation, batching.

  sources.py     make_source(c.data, split), ArraySource: grain data sources
  multicrop.py   MultiCrop: decode into a canvas, draw crop boxes and flips (host)
  crop_resize.py crop_groups: cut, resize (PIL bilinear) and flip the crops (device)
  pipeline.py    make_train_iterator: sharded global uint8 crop batches on the mesh
  augment.py     augment_crops: colour jitter, grayscale, blur, normalise (device)
  show_crops.py  show_crops: a PNG of some images, their crop boxes and augmented crops

Import the modules explicitly; this package imports nothing on its own.
"""
