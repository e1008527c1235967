"""The Keras front end: Keras models (.keras, .h5, SavedModel) loaded safely, pruned
and trained with tfmot, and exported to other formats."""
