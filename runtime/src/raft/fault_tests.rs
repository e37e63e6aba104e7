// fault tests pending
