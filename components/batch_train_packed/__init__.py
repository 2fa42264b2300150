"""The batch_train_packed component."""
