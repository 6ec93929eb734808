"""The aiormq fast path, by concept: the version gate (`gate`) and the one table of aiormq
internals it checks (`internals`); the frame reader (`reader`, with `decoding`); direct
deliveries and their settlement frames (`delivery`); confirmed batches and copies
(`publishing`); what it counted (`events`).

Installed explicitly, connection by connection and channel by channel; refused, with one
log line saying why, on an aiormq or pamqp it was not written for. The AMQP wire format it
packs is `ingest.rabbitmq._wire`, which holds no library internals.
"""
