from omnistream.cli import main

raise SystemExit(main())
