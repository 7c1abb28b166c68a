"""Training data: text documents packed into windows, and pre-tokenized memmap instances."""

# Label value the loss skips (torch's cross_entropy default): masked tokens and padding.
IGNORE_INDEX = -100
