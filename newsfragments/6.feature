Delivery agents `maildir`, `lmtp`, `pipe`, `discard` and `aliases`, conformance test kits in `mailfw.testing`, and an example third-party webhook plugin.
