"""KV over the wire: chunking and (de)serialization with checksums (codec), optional int8
compression (compression, quant), the prefill-side sender, and the decode-side receiver with its
leases. Protobuf only, nothing pickled."""
