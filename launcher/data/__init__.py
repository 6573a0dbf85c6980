"""Training data: formats (chat, instruction, completion) turn rows into token ids + labels
(build.py, chat.py, ...); packing, the on-disk cache and `ftl preprocess` sit beside them; the shared
types are in types.py."""
