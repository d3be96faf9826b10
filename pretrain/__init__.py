"""Self-supervised pretraining of timm encoders on prepared shards, with backbone export."""
