"""captioner: image captioning with a ResNet18 encoder, an attention bridge and a Transformer/LSTM decoder."""

__version__ = "0.1.0"
