"""The data stage: records read, chat-templated, tokenized (cached per node), batched and reported."""
