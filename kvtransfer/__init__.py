"""KV over the wire: chunking and (de)serialization with checksums (codec), the prefill-side
sender, and the decode-side receiver with its leases. Protobuf only, nothing pickled."""
