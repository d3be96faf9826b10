"""Self-supervised methods: networks around an encoder that produce a training loss."""
