"""Stubs generated from proto/minibatch/v1/minibatch.proto (see ../../generate.py).

`minibatch_pb2` holds the messages; `minibatch_pb2_grpc` the stock service stub
(`BatchServiceStub`), for callers who want plain grpcio. The client in this
package uses only `minibatch_pb2`.
"""
